"""Training curves as a PNG, drawn with matplotlib (the Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from vlpipe.io import atomic_write

PANEL_W, PANEL_H, DPI = 480, 240, 100  # pixels per panel


def line_plots(path: Path, series: dict[str, tuple[list[float], list[float]]]) -> Path:
    """One panel per series {name: (xs, ys)}, stacked vertically, sharing the step axis; a
    series of a few points (validation after each epoch) is drawn with markers."""
    plt = _pyplot()
    size = (PANEL_W / DPI, PANEL_H * len(series) / DPI)
    fig, axes = plt.subplots(len(series), 1, figsize=size, dpi=DPI, sharex=True, squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes[:, 0], series.items(), strict=True):
        ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, linewidth=1.5)
        ax.set_title(name, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step", fontsize=8)
    return _save(fig, path)


def panel_plots(path: Path, panels: dict[str, dict[str, tuple[list[float], list[float]]]]) -> Path:
    """One panel per entry {title: {curve: (xs, ys)}}, stacked vertically, sharing the step
    axis; each panel overlays its curves (training per step, validation as markers)."""
    plt = _pyplot()
    size = (PANEL_W / DPI, PANEL_H * len(panels) / DPI)
    fig, axes = plt.subplots(len(panels), 1, figsize=size, dpi=DPI, sharex=True, squeeze=False)
    for ax, (title, curves) in zip(axes[:, 0], panels.items(), strict=True):
        for name, (xs, ys) in curves.items():
            few = len(xs) <= 50
            ax.plot(xs, ys, marker="o" if few else None, markersize=3, linewidth=1.2, label=name)
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step", fontsize=8)
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path


def bar_plot(path: Path, bars: list[tuple[str, float, float]], label: str) -> Path:
    """One horizontal bar per (name, mean, std), the std as an error bar (a report's metric per
    configuration)."""
    plt = _pyplot()
    height = max(PANEL_H, 40 + 28 * len(bars))
    fig, ax = plt.subplots(figsize=(PANEL_W * 1.4 / DPI, height / DPI), dpi=DPI)
    names = [b[0] for b in bars]
    ax.barh(range(len(bars)), [b[1] for b in bars], xerr=[b[2] for b in bars], capsize=3)
    ax.set_yticks(range(len(bars)), names, fontsize=8)
    ax.invert_yaxis()  # the table's order, top to bottom
    for i, (_, mean, std) in enumerate(bars):
        ax.text(mean + std, i, f" {mean:.1f}", va="center", fontsize=7)
    ax.set_xlabel(label, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def overlay_plot(path: Path, curves: dict[str, list[tuple[int, float]]], label: str) -> Path:
    """Every curve {name: [(step, value)]} on one panel (validation curves of a report)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(PANEL_W * 1.4 / DPI, PANEL_H * 1.5 / DPI), dpi=DPI)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, label=name)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(label, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=7)
    return _save(fig, path)
