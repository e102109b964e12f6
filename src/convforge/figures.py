"""Matplotlib figures without pyplot: an Agg-backed Figure (no display, no global state) and its PNG bytes."""

from __future__ import annotations

import io
from typing import Any

DPI = 110


def new_figure(width: float, height: float, *, dpi: int = DPI, constrained: bool = True) -> Any:
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches drawn on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any) -> bytes:
    """The figure as PNG bytes, at its own dpi."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=fig.dpi)
    return out.getvalue()
