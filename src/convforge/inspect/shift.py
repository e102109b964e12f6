"""Distribution shift between two sets of k x k filters, as in CNN Filter DB (Gavrikov & Keuper, CVPR 2022).

1. each filter is divided by its own max |w| (all-zero filters stay zero);
2. a k^2-component PCA is fitted on the union of both sets;
3. for each component, both sets' coefficients are histogrammed into 70 bins over one shared
   range (the min and max of the union); empty bins are set to float32 epsilon and each
   histogram is renormalised to sum 1;
4. D = sum over components of (explained-variance ratio x symmetric KL divergence), natural log,
   with KL_sym(P, Q) = KL(P || Q) + KL(Q || P) = sum (p - q) log(p / q).

Identical sets give exactly 0. A component with zero variance in the union contributes 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from convforge.errors import ConvforgeError

BINS = 70
EPS = float(np.finfo(np.float32).eps)


def as_filter_matrix(x: Any, kernel: int = 3) -> torch.Tensor:
    """A float32 (N, k^2) tensor from a model, a Filters, an (N, k^2) or (..., k, k) array or tensor."""
    from convforge.inspect.filters import Filters, extract_filters

    if isinstance(x, nn.Module):
        x = extract_filters(x, kernel)
    if isinstance(x, Filters):
        x = x.filters
    t = torch.as_tensor(x)
    if t.dim() >= 3 and t.shape[-1] == t.shape[-2]:
        t = t.reshape(-1, t.shape[-1] * t.shape[-2])
    if t.dim() != 2:
        raise ConvforgeError(f"expected filters of shape (N, k*k) or (..., k, k), got {tuple(t.shape)}")
    return t.to(torch.float32)


def normalise(filters: torch.Tensor) -> torch.Tensor:
    """Each row divided by its own max |w|; zero rows stay zero."""
    scale = filters.abs().amax(dim=1, keepdim=True)
    scale[scale == 0] = 1.0
    return filters / scale


@dataclass
class PCA:
    mean: torch.Tensor        # (d,) float64
    components: torch.Tensor  # (d, d) float64, columns sorted by decreasing variance
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor


def _moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, column sums, uncentred scatter x^T x), accumulated in float64 in slices."""
    d = x.shape[1]
    total = torch.zeros(d, dtype=torch.float64)
    scatter = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, x.shape[0], 1 << 20):
        part = x[start:start + (1 << 20)].to(torch.float64)
        total += part.sum(dim=0)
        scatter += part.T @ part
    return int(x.shape[0]), total, scatter


def pca_from_moments(n: int, total: torch.Tensor, scatter: torch.Tensor) -> PCA:
    mean = total / max(n, 1)
    cov = (scatter - n * torch.outer(mean, mean)) / max(n - 1, 1)
    cov = (cov + cov.T) / 2
    values, vectors = torch.linalg.eigh(cov)
    order = torch.argsort(values, descending=True)
    values = values[order].clamp_min(0.0)
    vectors = vectors[:, order]
    s = float(values.sum())
    ratio = values / s if s > 0 else torch.zeros_like(values)
    return PCA(mean=mean, components=vectors, explained_variance=values, explained_variance_ratio=ratio)


def fit_pca(*sets: torch.Tensor) -> PCA:
    """A full PCA (k^2 components) of the union of ``sets`` (already normalised)."""
    n, total, scatter = 0, None, None
    for x in sets:
        ni, ti, si = _moments(x)
        n += ni
        total = ti if total is None else total + ti
        scatter = si if scatter is None else scatter + si
    return pca_from_moments(n, total, scatter)


def _kl_sym(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return ((p - q) * torch.log(p / q)).sum(dim=-1)


def _hist(values: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    h = torch.histc(values, bins=bins, min=lo, max=hi).to(torch.float64)
    h = h / h.sum()
    h[h == 0] = EPS
    return h / h.sum()


def shift_details(a: Any, b: Any, bins: int = BINS, kernel: int = 3) -> dict[str, Any]:
    """The divergence of ``a`` and ``b`` and its per-component parts (see the module docstring)."""
    xa = normalise(as_filter_matrix(a, kernel))
    xb = normalise(as_filter_matrix(b, kernel))
    if xa.shape[0] == 0 or xb.shape[0] == 0:
        raise ConvforgeError(f"distribution shift needs filters in both sets (got {xa.shape[0]} and {xb.shape[0]})")
    if xa.shape[1] != xb.shape[1]:
        raise ConvforgeError(f"the two filter sets have different kernel sizes ({xa.shape[1]} vs {xb.shape[1]} taps)")
    pca = fit_pca(xa, xb)
    mean = pca.mean.to(torch.float32)
    basis = pca.components.to(torch.float32)
    pa = (xa - mean) @ basis
    pb = (xb - mean) @ basis
    lo = torch.minimum(pa.amin(dim=0), pb.amin(dim=0))
    hi = torch.maximum(pa.amax(dim=0), pb.amax(dim=0))
    kl = torch.zeros(basis.shape[1], dtype=torch.float64)
    for c in range(basis.shape[1]):
        l, h = float(lo[c]), float(hi[c])
        if not h > l:
            continue
        col_a, col_b = pa[:, c].contiguous(), pb[:, c].contiguous()
        kl[c] = _kl_sym(_hist(col_a, l, h, bins), _hist(col_b, l, h, bins))
    ratio = pca.explained_variance_ratio
    return {"divergence": float((ratio * kl).sum()), "kl": kl.tolist(), "explained_variance_ratio": ratio.tolist(),
            "n": [int(xa.shape[0]), int(xb.shape[0])]}


def distribution_shift(a: Any, b: Any, bins: int = BINS, kernel: int = 3) -> float:
    """The CNN-Filter-DB divergence of two filter sets: models, Filters or (N, k^2) arrays."""
    return shift_details(a, b, bins, kernel)["divergence"]


def shift_matrix(groups: Mapping[str, Any] | Sequence[tuple[str, Any]], bins: int = BINS,
                 kernel: int = 3) -> tuple[list[str], list[list[float]]]:
    """The symmetric pairwise divergence matrix of named filter groups (diagonal 0)."""
    items = list(groups.items()) if isinstance(groups, Mapping) else list(groups)
    names = [name for name, _ in items]
    sets = [as_filter_matrix(x, kernel) for _, x in items]
    matrix = [[0.0] * len(sets) for _ in sets]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            matrix[i][j] = matrix[j][i] = distribution_shift(sets[i], sets[j], bins, kernel)
    return names, matrix
