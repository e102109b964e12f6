"""MATLAB-compatible bicubic ``imresize`` on float tensors, one dimension at a time.

The super-resolution literature makes its low-resolution images and its bicubic baseline with
MATLAB's ``imresize(x, scale, 'bicubic')``; this reproduces it for floating-point input:

- Keys' cubic kernel with a = -0.5;
- when downscaling (scale < 1) the kernel is widened by 1/scale and scaled by ``scale``
  (MATLAB's default ``'Antialiasing', true``), so 4 taps become 4/scale;
- output pixel x (1-based) reads input position ``u = x/scale + 0.5*(1 - 1/scale)``;
- taps falling outside the image are mirrored with the edge pixel repeated (MATLAB's
  ``[1:n, n:-1:1]`` index table), and each row of weights is normalised to sum to 1;
- the output size is ``ceil(scale * size)``; the dimension with the smaller scale is resized first.

Differences from MATLAB, all on purpose:

- only floating-point input: MATLAB rounds uint8 input to uint8 after each dimension, here
  nothing is rounded or clamped (convert with ``x.double() / 255`` as SR evaluation code does);
- ``ceil(scale * size)`` is taken after snapping products within 1e-9 of an integer to it, so that
  e.g. ``49 * (1/49)`` gives 1 and never rounds the wrong way (MATLAB computes the bare ``ceil``);
- computed in the input's dtype (float32 or float64): MATLAB works in double. In float32 the
  results differ by about 1e-7, which can flip a later ``uint8`` rounding of a value at exactly .5.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

KERNEL_WIDTH = 4.0
# Lines longer than this many times the tap count are resized tap by tap rather than by a dense matrix.
DENSE_TAP_FACTOR = 8


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def _out_length(length: int, scale: float) -> int:
    exact = length * scale
    nearest = round(exact)
    return int(nearest) if abs(exact - nearest) < 1e-9 else math.ceil(exact)


@lru_cache(maxsize=64)
def resize_taps(in_length: int, out_length: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MATLAB's bicubic contributions along one dimension as (indices, weights), each (out_length, taps):
    output ``i`` is ``sum_t weights[i, t] * input[indices[i, t]]`` (0-based indices, borders mirrored)."""
    if scale < 1:
        width = KERNEL_WIDTH / scale

        def kernel(d: torch.Tensor) -> torch.Tensor:
            return scale * cubic(scale * d)
    else:
        width, kernel = KERNEL_WIDTH, cubic
    x = torch.arange(1, out_length + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    ind = left[:, None] + torch.arange(taps, dtype=torch.float64)
    weights = kernel(u[:, None] - ind)
    weights = weights / weights.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(in_length), torch.arange(in_length - 1, -1, -1)])
    return mirror[torch.remainder(ind.long() - 1, 2 * in_length)], weights


@lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float) -> torch.Tensor:
    """The (out_length, in_length) float64 matrix of MATLAB's bicubic contributions along one dimension."""
    columns, weights = resize_taps(in_length, out_length, scale)
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, columns, weights)
    return matrix


def _resize_along(x: torch.Tensor, axis: int, length: int, out_length: int, scale: float) -> torch.Tensor:
    """Resize ``x`` along ``axis`` (-2 or -1) from ``length`` to ``out_length``."""
    columns, weights = resize_taps(length, out_length, scale)
    if length <= DENSE_TAP_FACTOR * columns.shape[1]:  # short lines: one small dense matrix product is fastest
        matrix = resize_matrix(length, out_length, scale).to(device=x.device, dtype=x.dtype)
        return torch.matmul(matrix, x) if axis == -2 else torch.matmul(x, matrix.T)
    # Long lines: a dense matrix would be almost all zeros (cost out x in); sum the few taps instead,
    # picking whole rows (contiguous copies), so a last-axis resize works on the transposed image.
    if axis == -1:
        return _resize_along(x.transpose(-1, -2).contiguous(), -2, length, out_length, scale).transpose(-1, -2)
    columns, weights = columns.to(x.device), weights.to(device=x.device, dtype=x.dtype)
    out = None
    for t in range(columns.shape[1]):
        term = x.index_select(-2, columns[:, t]) * weights[:, t, None]
        out = term if out is None else out.add_(term)
    return out


def imresize(x: torch.Tensor, scale: float | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize float images (..., H, W), e.g. (N, C, H, W), like MATLAB's ``imresize(x, scale, 'bicubic')``.

    Give ``scale`` (the same for both dimensions; output ``ceil(scale * H)`` x ``ceil(scale * W)``)
    or ``size`` = (H_out, W_out) (then each dimension's scale is H_out / H, W_out / W).
    """
    if not x.is_floating_point():
        raise TypeError(f"imresize needs a floating-point tensor, got {x.dtype}: convert first, e.g. x.double() / 255")
    if x.ndim < 2:
        raise ValueError(f"imresize needs images of shape (..., H, W), got shape {tuple(x.shape)}")
    if (scale is None) == (size is None):
        raise ValueError("imresize needs exactly one of scale= and size=")
    h, w = x.shape[-2:]
    if scale is not None:
        if not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"scale must be a positive number, got {scale}")
        scales = (float(scale), float(scale))
        out = (_out_length(h, scales[0]), _out_length(w, scales[1]))
    else:
        out = (int(size[0]), int(size[1]))
        if min(out) < 1:
            raise ValueError(f"size must be positive, got {size}")
        scales = (out[0] / h, out[1] / w)
    if min(out) < 1:
        raise ValueError(f"scale {scale} gives an empty image from {h}x{w}")
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    for dim in order:
        length = (h, w)[dim]
        if out[dim] == length and scales[dim] == 1.0:
            continue
        x = _resize_along(x, -2 if dim == 0 else -1, length, out[dim], scales[dim])
    return x.contiguous()
