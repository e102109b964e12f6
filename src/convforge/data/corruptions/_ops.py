"""Helpers the corruptions share: batch Gaussian filter, clipped zoom, ImageMagick's motion blur, plasma fractal.

Every helper works on a batch (axis 0) and treats each image on its own, so a batch gives the same result as its
images one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Options:
    """What a corruption needs besides its parameters: the table name and the optional frost photo folder."""

    table: str
    frost_dir: Path | None = None


def gaussian_hw(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """scipy's Gaussian filter over the two spatial axes (1, 2) of a batch (N, H, W[, C]).

    With the defaults this is scikit-image's ``gaussian(..., multichannel=True)`` that the reference calls.
    """
    sigmas = [0.0, sigma, sigma] + [0.0] * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the central 1/factor of every image (N, H, W, C) back to (H, W), as the reference's helper.

    The reference zooms the crop with ``scipy.ndimage.zoom(order=1)`` and trims the centre; here the same bilinear
    samples (output index * (crop - 1) / (zoomed - 1)) are taken for the kept rows and columns only.
    """
    out = x
    for axis in (1, 2):
        size = x.shape[axis]
        crop = int(np.ceil(size / factor))
        zoomed = int(round(crop * factor))
        first = (size - crop) // 2 + 0.0
        trim = (zoomed - size) // 2
        step = (crop - 1) / (zoomed - 1) if zoomed > 1 else 1.0
        coords = first + (trim + np.arange(size)) * step
        lo = np.floor(coords).astype(np.int64)
        hi = np.minimum(lo + 1, (size - crop) // 2 + crop - 1)
        frac = (coords - lo).astype(x.dtype)
        shape = [1] * x.ndim
        shape[axis] = size
        frac = frac.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    return out


def motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage on a batch (N, H, W, C), one angle (degrees) per image; float output.

    The kernel has 2*ceil(radius)+1 taps with half-Gaussian weights exp(-i^2 / 2 sigma^2) (normalised); tap i reads
    the pixel at the rounded offset i*(cos a, sin a) (x right, y down); pixels outside repeat the edge.
    """
    width = int(2 * math.ceil(radius) + 1)
    taps = np.arange(width, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * sigma * sigma))
    weights /= weights.sum()
    rad = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None]
    px, py = width * np.sin(rad), width * np.cos(rad)
    norm = np.hypot(px, py)
    off_x = np.ceil(taps * py / norm - 0.5).astype(np.int64)  # (N, width)
    off_y = np.ceil(taps * px / norm - 0.5).astype(np.int64)
    n, h, w = x.shape[:3]
    pad = width
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    idx_n = np.arange(n)[:, None, None]
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(width):
        rows = pad + np.arange(h)[None, :] + off_y[:, i:i + 1]
        cols = pad + np.arange(w)[None, :] + off_x[:, i:i + 1]
        out += weights[i] * padded[idx_n, rows[:, :, None], cols[:, None, :]]
    return out


def plasma_fractal(rngs: list[np.random.Generator], mapsize: int, decay: float) -> np.ndarray:
    """Diamond-square height maps (N, mapsize, mapsize) in [0, 1], as the reference's ``plasma_fractal``.

    Each image draws all its uniforms at once from its own generator, so the maps do not depend on the batch.
    """
    levels, step = [], mapsize
    while step >= 2:
        levels.append(step)
        step //= 2
    sizes = [(mapsize // s) ** 2 for s in levels for _ in range(3)]
    draws = np.stack([rng.random(sum(sizes)) for rng in rngs]) if rngs else np.zeros((0, sum(sizes)))
    n = len(rngs)
    grid = np.zeros((n, mapsize, mapsize))
    pieces = iter(np.split(draws, np.cumsum(sizes)[:-1], axis=1))
    wibble = 100.0
    for step in levels:
        k, half = mapsize // step, step // 2
        corners = grid[:, 0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        grid[:, half::step, half::step] = _wibbled(square, next(pieces), wibble, k)
        centres, corners = grid[:, half::step, half::step], grid[:, 0::step, 0::step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        grid[:, 0::step, half::step] = _wibbled(left, next(pieces), wibble, k)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        grid[:, half::step, 0::step] = _wibbled(top, next(pieces), wibble, k)
        wibble /= decay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    return grid / grid.max(axis=(1, 2), keepdims=True)


def _wibbled(total: np.ndarray, uniform: np.ndarray, wibble: float, k: int) -> np.ndarray:
    """The mean of four neighbours plus wibble * U(-wibble, wibble), from uniforms in [0, 1)."""
    return total / 4 + wibble * (-wibble + 2 * wibble * uniform.reshape(-1, k, k))


def resize_linear(image: np.ndarray, scale: float) -> np.ndarray:
    """OpenCV's ``resize(img, (0, 0), fx=scale, fy=scale)`` (INTER_LINEAR, half-pixel centres) of one uint8 image."""
    h, w = image.shape[:2]
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    rows = np.clip((np.arange(out_h) + 0.5) / scale - 0.5, 0, h - 1)
    cols = np.clip((np.arange(out_w) + 0.5) / scale - 0.5, 0, w - 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    chans = [ndimage.map_coordinates(image[..., c].astype(np.float64), [rr, cc], order=1, mode="nearest")
             for c in range(image.shape[2])]
    return np.clip(np.rint(np.stack(chans, axis=-1)), 0, 255).astype(np.uint8)
