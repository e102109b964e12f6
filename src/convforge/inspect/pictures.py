"""PNG pictures of filters and their metrics (matplotlib, Agg canvas: no display needed).

Every function draws one figure and writes it atomically to ``path``; it returns the path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convforge.figures import figure_png, new_figure
from convforge.fileio import atomic_write_bytes


def _figure(width: float, height: float) -> Any:
    return new_figure(width, height, dpi=100, constrained=False)


def _save(fig: Any, path: str | Path) -> Path:
    return atomic_write_bytes(path, figure_png(fig))


def _grid(tiles: np.ndarray, cols: int, pad: int = 1, fill: float = np.nan) -> np.ndarray:
    """Tile (n, h, w[, c]) images into one mosaic with ``pad`` pixels of ``fill`` between them."""
    n, h, w = tiles.shape[:3]
    rows = max(1, math.ceil(n / cols))
    extra = tiles.shape[3:]
    mosaic = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, *extra), fill, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        mosaic[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tiles[i]
    return mosaic


def first_layer_rgb(weight: np.ndarray, path: str | Path, title: str = "first layer") -> Path:
    """The filters of a layer with 3 input channels as RGB tiles, each scaled to its own max |w|."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"an RGB picture needs a weight (C_out, 3, k, k), got {w.shape}")
    tiles = w.transpose(0, 2, 3, 1)
    scale = np.abs(tiles).reshape(len(tiles), -1).max(axis=1)
    scale[scale == 0] = 1.0
    tiles = 0.5 + 0.5 * tiles / scale[:, None, None, None]
    cols = min(16, len(tiles))
    mosaic = _grid(tiles, cols, fill=1.0)
    fig = _figure(min(12, 1 + cols * 0.7), 1 + math.ceil(len(tiles) / cols) * 0.7)
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{title}: {len(tiles)} RGB filters (grey = 0)")
    fig.tight_layout()
    return _save(fig, path)


def layer_grid(weight: np.ndarray, path: str | Path, title: str, max_out: int = 32, max_in: int = 32) -> Path:
    """A layer's k x k filters: rows = output channels, columns = input channels (diverging colours,
    one symmetric scale for the layer)."""
    w = np.asarray(weight, dtype=np.float32)[:max_out, :max_in]
    c_out, c_in, k, _ = w.shape
    tiles = w.reshape(c_out * c_in, k, k)
    mosaic = _grid(tiles, c_in)
    limit = float(np.nanmax(np.abs(mosaic))) or 1.0
    fig = _figure(min(14, 1.5 + c_in * 0.35), min(14, 1.2 + c_out * 0.35))
    ax = fig.add_subplot()
    image = ax.imshow(mosaic, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_xlabel("input channel")
    ax.set_ylabel("output channel")
    ax.set_xticks([])
    ax.set_yticks([])
    shown = f" (first {c_out} x {c_in} shown)" if weight.shape[0] > c_out or weight.shape[1] > c_in else ""
    ax.set_title(f"{title}{shown}")
    fig.colorbar(image, ax=ax, shrink=0.6)
    fig.tight_layout()
    return _save(fig, path)


def eigen_filters(components: np.ndarray, ratio: Sequence[float], path: str | Path, title: str) -> Path:
    """The PCA basis (columns of ``components``, k^2 x k^2) as k x k images with their explained variance."""
    comps = np.asarray(components, dtype=np.float32)
    taps = comps.shape[0]
    k = int(round(math.sqrt(taps)))
    cols = min(taps, 9)
    rows = math.ceil(taps / cols)
    fig = _figure(1.4 * cols + 0.5, 1.6 * rows + 0.6)
    for j in range(taps):
        ax = fig.add_subplot(rows, cols, j + 1)
        basis = comps[:, j].reshape(k, k)
        limit = float(np.abs(basis).max()) or 1.0
        ax.imshow(basis, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"PC{j + 1}: {100 * ratio[j]:.1f}%", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


DEPTH_METRICS = (("sparsity", "sparsity"), ("variance_entropy_clean_norm", "normalised clean variance entropy"),
                 ("orthogonality", "orthogonality"), ("norm_l2", "L2 norm"))


def metrics_vs_depth(models: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                     thresholds: Mapping[str, float] | None = None) -> Path:
    """Metric curves against normalised depth, one line per model (rows from ``layer_metrics``)."""
    fig = _figure(11, 7.5)
    for i, (key, label) in enumerate(DEPTH_METRICS):
        ax = fig.add_subplot(2, 2, i + 1)
        for name, rows in models.items():
            ax.plot([r["depth"] for r in rows], [r[key] for r in rows], marker="o", markersize=3, label=name)
        if thresholds and key == "sparsity":
            ax.axhline(thresholds["sparse"], color="grey", linestyle="--", linewidth=0.8)
        if thresholds and key == "variance_entropy_clean_norm":
            for t in ("near_random", "collapsed"):
                ax.axhline(thresholds[t], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("normalised depth")
        ax.set_ylabel(label)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("filter metrics over depth (dashed: flag thresholds)")
    fig.tight_layout()
    return _save(fig, path)


def shift_heatmap(names: Sequence[str], matrix: Sequence[Sequence[float]], path: str | Path) -> Path:
    """The pairwise divergence matrix as a heat map with the values written in the cells."""
    m = np.asarray(matrix, dtype=np.float64)
    n = len(names)
    fig = _figure(2.5 + 0.9 * n, 2 + 0.8 * n)
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    top = m.max() if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=8,
                    color="black" if m[i, j] > top / 2 else "white")
    ax.set_title("filter distribution shift (symmetric KL over PCA components)")
    fig.colorbar(image, ax=ax, shrink=0.7)
    fig.tight_layout()
    return _save(fig, path)
