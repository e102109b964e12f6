"""Weather corruptions: snow, frost, fog (float output in [0, 255])."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from convforge.data.corruptions import _ops
from convforge.data.corruptions._ops import Options
from convforge.data.corruptions.params import FOG_MAPSIZE, FROST_DRAWN, FROST_FILES, FROST_RESIZE
from convforge.errors import DataError

_PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# The procedural ice texture: feature sizes in pixels of the reference's frost photographs (scaled like them by
# FROST_RESIZE), and the ranges its mean grey level, spread and tint are drawn from, measured on those photographs.
_ICE_SIGMAS = (16.0, 8.0, 3.0)
_ICE_LEVEL, _ICE_SPREAD = (95.0, 205.0), (20.0, 42.0)
_ICE_TINT = ((0.6, 1.0), (0.98, 1.15), (1.03, 1.3))
_ICE_LOWS, _ICE_HIGHS = zip(_ICE_LEVEL, _ICE_SPREAD, *_ICE_TINT)


def snow(x: np.ndarray, c: tuple[float, ...], rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Zoomed, thresholded Gaussian flakes, motion-blurred at U(-135, -45) degrees, added twice (also rotated 180
    degrees) to the image lightened towards 1.5 * grey + 0.5."""
    loc, scale, zoom, threshold, radius, sigma, blend = c
    n, h, w, _ = x.shape
    flakes, angles = np.empty((n, h, w, 1)), np.empty(n)
    for i, rng in enumerate(rngs):
        flakes[i, ..., 0] = rng.normal(size=(h, w), loc=loc, scale=scale)
        angles[i] = rng.uniform(-135, -45)
    flakes = _ops.clipped_zoom(flakes, zoom)
    flakes[flakes < threshold] = 0
    flakes8 = (np.clip(flakes, 0, 1) * 255).astype(np.uint8)
    layer = np.clip(np.rint(_ops.motion_blur(flakes8.astype(np.float64), radius, sigma, angles)), 0, 255) / 255.0
    xf = x.astype(np.float32) / 255.0
    grey = (xf[..., 0] * 0.299 + xf[..., 1] * 0.587 + xf[..., 2] * 0.114)[..., None]
    xf = blend * xf + (1 - blend) * np.maximum(xf, grey * 1.5 + 0.5)
    return np.clip(xf + layer + np.rot90(layer, 2, axes=(1, 2)), 0, 1) * 255


def fog(x: np.ndarray, c: tuple[float, float], rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Add ``strength`` times a plasma fractal (cropped from a map of the reference's side, or the next power of two
    that covers the image), then rescale so the image maximum stays where it was."""
    strength, decay = c
    n, h, w, _ = x.shape
    mapsize = max(FOG_MAPSIZE[opts.table], 1 << (max(h, w) - 1).bit_length())
    plasma = _ops.plasma_fractal(rngs, mapsize, decay)[:, :h, :w, None]
    xf = x / 255.0
    peak = xf.max(axis=(1, 2, 3), keepdims=True)
    return np.clip((xf + strength * plasma) * peak / (peak + strength), 0, 1) * 255


def frost(x: np.ndarray, c: tuple[float, float], rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Blend ``c[0] * image + c[1] * frost`` where frost is a random crop of a frost photograph from
    ``opts.frost_dir`` (as the reference), or else a procedural ice texture."""
    n, h, w, _ = x.shape
    scale = FROST_RESIZE[opts.table]
    if opts.frost_dir is not None:
        layer = _photo_crops(rngs, h, w, opts.frost_dir, scale)
    else:
        layer = _ice(rngs, h, w, scale)
    return np.clip(c[0] * x.astype(np.float64) + c[1] * layer, 0, 255)


@functools.lru_cache(maxsize=4)
def _load_photos(folder: str, scale: float) -> tuple[tuple[np.ndarray, ...], int]:
    """The frost photographs of ``folder`` resized by ``scale``, and how many of them are drawn from: the
    reference's six files when all are there (it draws from the first five), otherwise every image, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"frost_dir {folder!r} is not a folder; give a folder of frost photographs or leave it unset")
    if all((root / name).is_file() for name in FROST_FILES):
        paths, drawn = [root / name for name in FROST_FILES], FROST_DRAWN
    else:
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in _PHOTO_SUFFIXES)
        drawn = len(paths)
    if not paths:
        raise DataError(f"frost_dir {folder!r} holds no images ({', '.join(_PHOTO_SUFFIXES)})")
    photos = []
    for path in paths:
        with Image.open(path) as im:
            photo = np.asarray(im.convert("RGB"))
        photos.append(photo if scale == 1.0 else _ops.resize_linear(photo, scale))
    return tuple(photos), drawn


def _photo_crops(rngs: list[np.random.Generator], h: int, w: int, folder: Path, scale: float) -> np.ndarray:
    """One random (h, w) crop per image of a photo drawn from the first ``drawn``; a photo too small for the crop is
    first enlarged (bilinear) to (h + 1, w + 1) or more."""
    photos, drawn = _load_photos(str(folder), scale)
    out = np.empty((len(rngs), h, w, 3))
    for i, rng in enumerate(rngs):
        photo = photos[int(rng.integers(drawn))]
        grow = max((h + 1) / photo.shape[0], (w + 1) / photo.shape[1])
        if grow > 1:
            photo = _ops.resize_linear(photo, grow + 1e-6)
        top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
        out[i] = photo[top:top + h, left:left + w]
    return out


def _ice(rngs: list[np.random.Generator], h: int, w: int, scale: float) -> np.ndarray:
    """A procedural frost layer (N, h, w, 3) in [0, 255]: soft clouds plus two scales of thin crystal veins (the
    zero crossings of smoothed noise), bluish white, with a grey level and spread like the reference photographs."""
    n = len(rngs)
    noise = np.empty((n, 3, h, w))
    looks = np.empty((n, 5))
    for i, rng in enumerate(rngs):
        noise[i] = rng.standard_normal((3, h, w))
        looks[i] = rng.uniform(_ICE_LOWS, _ICE_HIGHS)
    fields = []
    for k, sigma in enumerate(_ICE_SIGMAS):
        field = _ops.gaussian_hw(noise[:, k], max(0.7, sigma * scale), mode="wrap")
        fields.append(field / (field.std(axis=(1, 2), keepdims=True) + 1e-12))
    veins = np.exp(-((fields[1] / 0.25) ** 2)) + 0.7 * np.exp(-((fields[2] / 0.3) ** 2))
    texture = 0.6 * fields[0] + 2.0 * veins
    texture = (texture - texture.mean(axis=(1, 2), keepdims=True)) / (texture.std(axis=(1, 2), keepdims=True) + 1e-12)
    grey = looks[:, 0, None, None] + looks[:, 1, None, None] * texture
    return np.clip(grey[..., None] * looks[:, None, None, 2:], 0, 255)
