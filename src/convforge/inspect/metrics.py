"""Filter-quality metrics per convolution layer, named as in torchconvquality (Gavrikov & Keuper).

For a weight W of shape (C_out, C_in/groups, k, k) and its N x k^2 filter matrix F:

- ``sparsity``: the share of rows of F whose every |value| is strictly below t = 0.01 * max|W|
  (t = 1 for an all-zero layer, so that all of its filters count as sparse).
- ``variance_entropy``: the columns of F centred; eigenvalues of their covariance (the squared
  singular values / (m - 1), m rows); shares p_j of their sum; H = -sum p_j log10 p_j with
  0 log 0 = 0. ``variance_entropy_norm`` = H / h(m), the fitted curve
  h(m) = L / (1 + exp(-k (log2 m - x0))) + b. ``variance_entropy_clean`` and ``_clean_norm``: the same
  over the non-sparse rows only.
- ``orthogonality``: rows of the C_out x (C_in/groups * k^2) matrix scaled to unit length;
  1 - (sum over ordered pairs a != b of |cos(a, b)|) / (C_out (C_out - 1)).
- ``norm_l1`` and ``norm_l2``: the L1 norm and the Euclidean (Frobenius) norm of W.

Where the reference definitions give NaN this module returns defined values:

- fewer than 2 rows (a single filter, or at most one non-sparse filter for the clean variants):
  the centred matrix is zero, so H = 0 and the normalised value is 0 (h(m) <= 0 for m <= 2);
- all variances zero (identical filters): H = 0;
- a zero variance share (a tap that is zero in every filter, a rank-deficient layer): 0 log 0 = 0;
- a single output channel: no pairs, orthogonality 1;
- an all-zero output channel: its cosine with every other channel counts as 0. (torchconvquality
  also adds |0 - 1| = 1 per zero channel from the diagonal, which this module does not.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from convforge.inspect.filters import conv_layers, layer_weight

# torchconvquality's fitted maximum-entropy curve (the entropy of random filters against m).
ENTROPY_CURVE = {"L": 1.2618047, "x0": 2.30436435, "k": 0.88767525, "b": -0.31050834}
SPARSITY_EPS = 0.01

METRIC_KEYS = ("sparsity", "variance_entropy", "variance_entropy_norm", "variance_entropy_clean",
               "variance_entropy_clean_norm", "orthogonality", "norm_l1", "norm_l2")

# Degeneration flags (see README, "Filter inspection"). The entropy flags read the *clean*
# normalised entropy, so that sparse filters do not count twice, and need at least
# MIN_FILTERS_FOR_ENTROPY non-sparse filters to be meaningful.
THRESHOLDS = {
    "sparse": 0.5,           # sparsity >= 0.5: at least half of the filters are (near) zero
    "near_random": 0.98,     # variance_entropy_clean_norm >= 0.98: as spread as random (untrained) filters
    "collapsed": 0.1,        # variance_entropy_clean_norm <= 0.1: nearly all filters on one direction
}
MIN_FILTERS_FOR_ENTROPY = 16

FLAG_TEXT = {
    "sparse": "mostly sparse (sparsity {sparsity:.3f} >= {t})",
    "near_random": "near-random (normalised clean entropy {variance_entropy_clean_norm:.3f} >= {t})",
    "collapsed": "collapsed (normalised clean entropy {variance_entropy_clean_norm:.3f} <= {t})",
}


def entropy_curve(m: int) -> float:
    """h(m): the normalising curve of the variance entropy; -inf < h, h(m) <= 0 for m <= 2."""
    if m < 1:
        return ENTROPY_CURVE["b"]
    c = ENTROPY_CURVE
    return c["L"] / (1.0 + math.exp(-c["k"] * (math.log2(m) - c["x0"]))) + c["b"]


def _moments(rows: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(m, column sums, scatter rows^T rows) in float64."""
    x = rows.to(torch.float64)
    return int(x.shape[0]), x.sum(dim=0), x.T @ x


def _entropy_from_moments(m: int, total: torch.Tensor, scatter: torch.Tensor) -> tuple[float, float]:
    if m < 2:
        return 0.0, 0.0
    mean = total / m
    centred = scatter - m * torch.outer(mean, mean)  # = X_c^T X_c, the centred scatter
    variances = torch.linalg.eigvalsh((centred + centred.T) / 2).clamp_min_(0.0)
    top = float(variances.max())
    variances[variances <= top * 1e-12] = 0.0  # rounding residue of exactly-zero directions
    total_var = float(variances.sum())
    if total_var <= 0.0:
        return 0.0, 0.0
    p = variances / total_var
    p = p[p > 0]
    entropy = float(-(p * torch.log10(p)).sum())
    h = entropy_curve(m)
    return entropy, (entropy / h if h > 0 else 0.0)


def variance_entropy(rows: torch.Tensor) -> tuple[float, float]:
    """(H, H / h(m)) of the m x k^2 matrix ``rows`` (see the module docstring)."""
    return _entropy_from_moments(*_moments(rows))


def orthogonality(weight: torch.Tensor) -> float:
    """1 - mean |cos| over ordered pairs of distinct output channels; 1 for one channel."""
    c_out = int(weight.shape[0])
    if c_out < 2:
        return 1.0
    rows = weight.reshape(c_out, -1).to(torch.float32)
    gram = rows @ rows.T
    norms = gram.diagonal().sqrt()
    norms[norms == 0] = 1.0
    cos = gram.div_(norms[:, None]).div_(norms[None, :]).abs_()
    off = float(cos.sum(dtype=torch.float64)) - float(cos.diagonal().sum(dtype=torch.float64))
    return 1.0 - off / (c_out * (c_out - 1))


def weight_metrics(weight: torch.Tensor) -> dict[str, float]:
    """All metrics of one weight tensor (C_out, C_in/groups, k, k)."""
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D convolution weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32)
    n = w.shape[0] * w.shape[1]
    f = w.reshape(n, -1)
    if n:
        low, high = torch.aminmax(f, dim=1)
        row_max = torch.maximum(high, low.neg_())
    else:
        row_max = f.new_zeros(0)
    peak = float(row_max.max()) if n else 0.0
    t = SPARSITY_EPS * peak if peak > 0 else 1.0
    sparse = row_max < t
    n_sparse = int(sparse.sum())
    m, total, scatter = _moments(f)
    ve, ve_norm = _entropy_from_moments(m, total, scatter)
    if n_sparse == 0:
        vc, vc_norm = ve, ve_norm
    elif n_sparse == n:
        vc, vc_norm = 0.0, 0.0
    else:  # the clean rows' moments: all rows' minus the (usually few) sparse rows'
        ms, ts, ss = _moments(f[sparse])
        vc, vc_norm = _entropy_from_moments(m - ms, total - ts, scatter - ss)
    return {
        "n": int(n),
        "sparsity": n_sparse / n if n else 0.0,
        "variance_entropy": ve,
        "variance_entropy_norm": ve_norm,
        "variance_entropy_clean": vc,
        "variance_entropy_clean_norm": vc_norm,
        "orthogonality": orthogonality(w),
        "norm_l1": float(torch.linalg.vector_norm(f, 1)),
        "norm_l2": float(torch.linalg.vector_norm(f, 2, dtype=torch.float64)),
        "max_abs": peak,
    }


def flags(metrics: dict[str, Any], thresholds: dict[str, float] | None = None) -> list[str]:
    """The degeneration flags of one layer's metrics: any of sparse, near_random, collapsed."""
    t = {**THRESHOLDS, **(thresholds or {})}
    found = []
    if metrics["sparsity"] >= t["sparse"]:
        found.append("sparse")
    clean = round(metrics["n"] * (1.0 - metrics["sparsity"]))
    if clean >= MIN_FILTERS_FOR_ENTROPY:
        if metrics["variance_entropy_clean_norm"] >= t["near_random"]:
            found.append("near_random")
        elif metrics["variance_entropy_clean_norm"] <= t["collapsed"]:
            found.append("collapsed")
    return found


def flag_message(name: str, flag: str, metrics: dict[str, Any], thresholds: dict[str, float] | None = None) -> str:
    t = {**THRESHOLDS, **(thresholds or {})}
    return f"layer {name}: " + FLAG_TEXT[flag].format(t=t[flag], **metrics)


def layer_metrics(model: nn.Module, kernel: int = 3, thresholds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per k x k convolution: its place (name, conv index, depth, channels, groups, stride,
    dilation), every metric of METRIC_KEYS, ``n`` (filters), ``max_abs`` and ``flags``."""
    rows = []
    for info, conv in conv_layers(model, kernel):
        row: dict[str, Any] = info.as_dict()
        row.update(weight_metrics(layer_weight(conv)))
        row["flags"] = flags(row, thresholds)
        rows.append(row)
    return rows


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Filter-count-weighted means of the metrics over layers (norms: summed in quadrature / L1)."""
    rows = list(rows)
    if not rows:
        return {}
    weights = np.array([r["n"] for r in rows], dtype=np.float64)
    out: dict[str, float] = {"layers": len(rows), "filters": int(weights.sum())}
    for key in ("sparsity", "variance_entropy_norm", "variance_entropy_clean_norm", "orthogonality"):
        out[key] = float(np.average([r[key] for r in rows], weights=weights))
    out["norm_l1"] = float(sum(r["norm_l1"] for r in rows))
    out["norm_l2"] = math.sqrt(sum(r["norm_l2"] ** 2 for r in rows))
    return out


def filter_health(model: nn.Module, kernel: int = 3, previous: dict[str, Any] | None = None,
                  thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """A compact health record of the model's k x k filters, for logging once per epoch.

    Returns ``{"layers": {name: {metric: value, ..., "flags": [...]}}, "summary": {...},
    "thresholds": {...}, "warnings": [...]}``. A warning is emitted for each (layer, flag) that is
    set now and was not set in ``previous`` (the record of the previous call), so that a
    degenerating layer is reported once, when it degenerates; with ``previous=None`` every flag warns.
    A model without k x k convolutions gives empty layers and no warnings.
    """
    try:
        rows = layer_metrics(model, kernel, thresholds)
    except Exception as exc:  # noqa: BLE001 - health logging must never stop training
        return {"layers": {}, "summary": {}, "thresholds": {**THRESHOLDS, **(thresholds or {})},
                "warnings": [f"filter health not computed: {type(exc).__name__}: {exc}"]}
    keep = ("depth", "n", "sparsity", "variance_entropy_norm", "variance_entropy_clean_norm", "orthogonality",
            "norm_l2")
    layers = {r["name"]: {**{k: r[k] for k in keep}, "flags": r["flags"]} for r in rows}
    before = (previous or {}).get("layers", {})
    warnings = [flag_message(r["name"], flag, r, thresholds) for r in rows for flag in r["flags"]
                if flag not in before.get(r["name"], {}).get("flags", [])]
    return {"layers": layers, "summary": summarize(rows), "thresholds": {**THRESHOLDS, **(thresholds or {})},
            "warnings": warnings}
