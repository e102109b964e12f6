"""Figures of a robustness evaluation (matplotlib's Agg canvas, no pyplot): PNG bytes."""

from __future__ import annotations

import io
from typing import Any

DPI = 110


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    return out.getvalue()


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
