"""Image quality as the super-resolution literature measures it: PSNR and SSIM on the luma channel.

The luma comes from ``convforge.data.superres.rgb_to_ycbcr_y`` (MATLAB's ``rgb2ycbcr``); ``ssim`` is
Wang et al.'s reference ``ssim_index.m`` (2004): an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, 'valid' filtering and the mean of the SSIM map, without the automatic
downsampling of later versions of that script. Both compute in float64.
"""

from __future__ import annotations

import math

import torch

def _plane(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"{name} must be one channel, (H, W) or (1, H, W); got shape {tuple(x.shape)}")
    return x.double()


def _pair(a: torch.Tensor, b: torch.Tensor, shave: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _plane(a, "a"), _plane(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {tuple(a.shape)} and {tuple(b.shape)}")
    if shave < 0:
        raise ValueError(f"shave must be >= 0, got {shave}")
    if shave:
        if min(a.shape) <= 2 * shave:
            raise ValueError(f"cannot shave {shave} pixels from each border of a {a.shape[0]}x{a.shape[1]} image")
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    return a, b


def psnr(a: torch.Tensor, b: torch.Tensor, shave: int = 0, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``, after removing ``shave``
    pixels from each border; ``inf`` for identical images."""
    a, b = _pair(a, b, shave)
    mse = torch.mean((a - b) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """MATLAB's ``fspecial('gaussian', size, sigma)``: a (size, size) float64 window summing to 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    window = g[:, None] * g[None, :]
    return window / window.sum()


def _gaussian_filter_valid(x: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """``filter2(fspecial('gaussian', size, sigma), x, 'valid')`` on (..., H, W), as two 1-D passes
    (the window is the outer product of a normalised 1-D Gaussian with itself)."""
    r = torch.arange(size, dtype=x.dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    h, w = x.shape[-2:]
    rows = sum(g[k] * x[..., k:h - size + 1 + k, :] for k in range(size))
    return sum(g[k] * rows[..., k:w - size + 1 + k] for k in range(size))


def ssim(a: torch.Tensor, b: torch.Tensor, shave: int = 0, data_range: float = 255.0) -> float:
    """Mean structural similarity (Wang et al. 2004) after removing ``shave`` pixels from each border."""
    a, b = _pair(a, b, shave)
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels (after shaving), got {a.shape[0]}x{a.shape[1]}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b, aa, bb, ab = _gaussian_filter_valid(torch.stack([a, b, a * a, b * b, a * b]))
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean().item()
