"""Training curves as a PNG, drawn with PIL so that no plotting library is required."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

PANEL_W, PANEL_H, MARGIN = 480, 240, 48


def line_plots(path: Path, series: dict[str, tuple[list[float], list[float]]]) -> Path:
    """One panel per series {name: (xs, ys)}, stacked vertically, with min/max labels on both
    axes; a series of a few points (validation after each epoch) is drawn with markers."""
    img = Image.new("RGB", (PANEL_W, PANEL_H * len(series)), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        _panel(draw, i * PANEL_H, name, xs, ys)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _panel(draw: ImageDraw.ImageDraw, top: int, name: str, xs, ys) -> None:
    left, right = MARGIN, PANEL_W - 12
    y0, y1 = top + 24, top + PANEL_H - 28
    draw.rectangle([left, y0, right, y1], outline="black")
    draw.text((left, top + 6), name, fill="black")
    lo, hi = min(ys), max(ys)
    span_y, span_x = (hi - lo) or 1.0, (max(xs) - min(xs)) or 1.0
    points = [
        (left + (x - min(xs)) / span_x * (right - left), y1 - (y - lo) / span_y * (y1 - y0))
        for x, y in zip(xs, ys, strict=True)
    ]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    if len(points) <= 50:
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    draw.text((4, y0), f"{hi:.3g}", fill="black")
    draw.text((4, y1 - 10), f"{lo:.3g}", fill="black")
    draw.text((left, y1 + 4), f"step {min(xs):g}", fill="black")
    draw.text((right - 70, y1 + 4), f"step {max(xs):g}", fill="black")
