"""Blur corruptions: defocus_blur, glass_blur, motion_blur, zoom_blur (float output in [0, 255])."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from convforge.data.corruptions import _ops
from convforge.data.corruptions._ops import Options


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's anti-aliased disk: a normalised disk on a grid of at least 17 x 17, Gaussian-blurred with a
    3 x 3 (radius <= 8) or 5 x 5 kernel of sigma ``alias_blur`` (OpenCV's reflect-101 border), zero margins cut."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    gx, gy = np.meshgrid(grid, grid)
    disk = (gx**2 + gy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.arange(ksize) - (ksize - 1) / 2
    gauss = np.exp(-(taps**2) / (2 * alias_blur**2))
    gauss /= gauss.sum()
    kernel = ndimage.correlate1d(disk, gauss, axis=0, mode="mirror")
    kernel = ndimage.correlate1d(kernel, gauss, axis=1, mode="mirror")
    rows, cols = np.flatnonzero(kernel.any(axis=1)), np.flatnonzero(kernel.any(axis=0))
    return kernel[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def defocus_blur(x: np.ndarray, c: tuple[float, float], rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Correlate every channel with the anti-aliased disk (OpenCV filter2D's reflect-101 border)."""
    kernel = _disk(*c)
    out = ndimage.correlate(x / 255.0, kernel[None, :, :, None], mode="mirror")
    return np.clip(out, 0, 1) * 255


def glass_blur(x: np.ndarray, c: tuple[float, int, int], rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Gaussian blur, local pixel shuffling, Gaussian blur again.

    The shuffle visits pixels (h, w) from the bottom-right corner inwards, ``iterations`` times, and draws
    (dx, dy) in [-delta, delta) per visit. The reference's tuple swap on numpy views copies the drawn neighbour into
    (h, w) and leaves the neighbour as it was; that is what made CIFAR-10-C and ImageNet-C, and what happens here.
    The visits run in the reference order, one step for the whole batch at a time.
    """
    sigma, delta, iterations = c
    n, h, w, ch = x.shape
    shuffled = (_ops.gaussian_hw(x / 255.0, sigma) * 255).astype(np.uint8)
    rows, cols = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
    pos_h, pos_w = np.repeat(rows, len(cols)), np.tile(cols, len(rows))
    visits = len(pos_h)
    draws = np.stack([rng.integers(-delta, delta, size=(iterations, visits, 2), dtype=np.int8) for rng in rngs])
    dst = pos_h * w + pos_w
    src = ((pos_h + draws[..., 1]) * w + (pos_w + draws[..., 0])).astype(np.int32)  # (N, iterations, visits)
    flat = shuffled.reshape(n, h * w, ch)
    batch = np.arange(n)
    for it in range(iterations):
        src_it = src[:, it]
        for p in range(visits):
            flat[:, dst[p]] = flat[batch, src_it[:, p]]
    return np.clip(_ops.gaussian_hw(shuffled / 255.0, sigma), 0, 1) * 255


def motion_blur(x: np.ndarray, c: tuple[float, float], rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """ImageMagick's motion blur of radius/sigma ``c`` at an angle drawn from U(-45, 45) degrees, 8-bit output."""
    angles = np.array([rng.uniform(-45, 45) for rng in rngs])
    out = _ops.motion_blur(x.astype(np.float64), c[0], c[1], angles)
    return np.clip(np.rint(out), 0, 255)


def zoom_blur(x: np.ndarray, c: tuple[float, float, float], rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Average the image with its centre zoomed by each factor of ``np.arange(*c)``."""
    factors = np.arange(*c)
    xf = (x / 255.0).astype(np.float32)
    out = np.zeros_like(xf)
    for factor in factors:
        out += _ops.clipped_zoom(xf, factor)
    return np.clip((xf + out) / (len(factors) + 1), 0, 1) * 255
