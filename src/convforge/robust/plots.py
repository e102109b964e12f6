"""Figures of a robustness evaluation (matplotlib's Agg canvas, no pyplot): PNG bytes."""

from __future__ import annotations

from typing import Any

from convforge.figures import figure_png as _png
from convforge.figures import new_figure as _figure


def accuracy_curve(result: dict[str, Any]) -> bytes:
    """Robust accuracy against eps, one line per attack (and norm), starting from the clean accuracy at 0."""
    fig = _figure(5.5, 3.8)
    ax = fig.subplots()
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in result["results"]:
        lines.setdefault(f"{row['attack']} ({row['norm']})", []).append((row["eps"], row["robust_accuracy"]))
    clean = result["clean"]["accuracy"]
    for label, points in lines.items():
        points = sorted([(0.0, clean), *points])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("eps (pixels on [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{result['model']}: {result['samples']} {result['split']} images of {result['data']}", fontsize=9)
    return _png(fig)


def corruption_heatmap(result: dict[str, Any]) -> bytes:
    """Accuracy per corruption (rows) and severity (columns), annotated, with the mean and (if any) mCE."""
    section = result["corruption"]
    names, levels = section["corruptions"], section["severities"]
    table = {(r["corruption"], r["severity"]): r["accuracy"] for r in section["rows"]}
    grid = [[table[name, level] for level in levels] for name in names]
    fig = _figure(1.6 + 0.7 * len(levels), 1.2 + 0.32 * len(names))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 60 else "black")
    ax.set_xticks(range(len(levels)), [str(v) for v in levels])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("severity")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    title = f"{result['model']}: mean corruption accuracy {section['mean_accuracy']:.1f}%"
    if section.get("mce") is not None:
        title += f", mCE {section['mce']:.1f}%"
    ax.set_title(title, fontsize=9)
    return _png(fig)
