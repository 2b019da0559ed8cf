"""Training curves as a PNG, drawn with matplotlib (the Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from vlpipe.io import atomic_write

PANEL_W, PANEL_H, DPI = 480, 240, 100  # pixels per panel


def line_plots(path: Path, series: dict[str, tuple[list[float], list[float]]]) -> Path:
    """One panel per series {name: (xs, ys)}, stacked vertically, sharing the step axis; a
    series of a few points (validation after each epoch) is drawn with markers."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    size = (PANEL_W / DPI, PANEL_H * len(series) / DPI)
    fig, axes = plt.subplots(len(series), 1, figsize=size, dpi=DPI, sharex=True, squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes[:, 0], series.items(), strict=True):
        ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, linewidth=1.5)
        ax.set_title(name, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path
