"""The 15 common corruptions of Hendrycks & Dietterich (CIFAR-10-C / ImageNet-C) at severities 1..5, seeded.

``corrupt(images, name, severity, seed)`` takes and returns uint8 batches (N, H, W, 3) or (N, H, W, 1). The
parameter values are those of hendrycks/robustness (``make_cifar_c.py`` for 32 px images, ``make_imagenet_c.py``
for 224 px; see ``params``); the code is a vectorised reimplementation with numpy, scipy, PIL and matplotlib.
``DEVIATIONS`` says where it cannot follow the reference exactly. As in the reference, the float result is clipped
to [0, 255] and truncated (not rounded) to uint8.

Every image draws its randomness from its own generator, seeded by (seed, corruption, severity, index in the split),
so corrupting a split in chunks (with ``first_index``) gives the same images as one call. The draws follow the
reference's distributions but not its global numpy random stream, so no image equals the released CIFAR-10-C or
ImageNet-C image pixel for pixel (those were also stored differently: ImageNet-C as JPEG of quality 85).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convforge.data.corruptions import blur, digital, noise, weather
from convforge.data.corruptions._ops import Options
from convforge.data.corruptions.params import TABLES
from convforge.errors import ConfigError, DataError

__all__ = ["CORRUPTIONS", "CORRUPTION_GROUPS", "DEVIATIONS", "PARAMS", "SEVERITIES", "corrupt"]

CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for group in CORRUPTION_GROUPS.values() for name in group)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
PARAMS: tuple[str, ...] = ("auto", "cifar", "imagenet")

DEVIATIONS: dict[str, str] = {
    "motion_blur": "The reference calls ImageMagick's MotionBlurImage through Wand on a PNG round trip; here the same "
                   "kernel (2*ceil(radius)+1 half-Gaussian taps along the drawn angle, edge pixels repeated) is "
                   "reimplemented in numpy, so a value can differ by one level where ImageMagick's quantum "
                   "arithmetic rounds differently.",
    "snow": "The flakes' motion blur is the numpy reimplementation of ImageMagick's MotionBlurImage that "
            "motion_blur uses (the reference calls ImageMagick through Wand), so a value can differ by one level.",
    "frost": "The reference blends random crops of six frost photographs shipped with its code (not part of this "
             "package); given a folder of frost photographs (frost_dir or CONVFORGE_FROST_DIR) they are used as the "
             "reference does, otherwise a procedural ice texture (smoothed clouds plus crystal veins, bluish white, "
             "with the photographs' grey level and spread) stands in, so frost here is not CIFAR-10-C's frost; "
             "the photographs' OpenCV bilinear resize (CIFAR, factor 0.2) is emulated with scipy.",
    "defocus_blur": "The reference blurs its disk kernel and filters with OpenCV (float32 GaussianBlur, filter2D); "
                    "here the same kernel and reflect-101 border with scipy in float64, so a value can differ by "
                    "one level after truncation.",
    "zoom_blur": "The reference zooms the whole central crop with scipy.ndimage.zoom(order=1) and trims it; here "
                 "the same bilinear samples are computed for the kept pixels only (equal within float32 rounding), "
                 "so a value can rarely differ by one level after truncation.",
    "elastic_transform": "The reference's affine step is OpenCV's warpAffine, whose bilinear weights are quantised "
                         "to 1/32 pixel; here scipy's exact bilinear map_coordinates with the same reflect-101 "
                         "border (and the affine's centre is (W//2, H//2) as x, y; the reference swaps them, "
                         "which only matters for images that are not square).",
}

Corruption = Callable[[np.ndarray, Any, list, Options], np.ndarray]
_FUNCTIONS: dict[str, Corruption] = {
    name: getattr(module, name)
    for module, group in ((noise, "noise"), (blur, "blur"), (weather, "weather"), (digital, "digital"))
    for name in CORRUPTION_GROUPS[group]
}
_DETERMINISTIC = frozenset({"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"})
_CHUNK_PIXELS = 1 << 20  # images are corrupted in chunks of about this many pixels, to bound the memory
_CHUNK_SCALE = {"glass_blur": 4}  # glass_blur's per-pixel loop runs once per chunk: fewer, larger chunks


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0, *, params: str = "auto",
            first_index: int = 0, frost_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Corrupt a uint8 batch (N, H, W, 3) or (N, H, W, 1) with corruption ``name`` at ``severity`` (1..5).

    ``params``: "cifar" (make_cifar_c.py values), "imagenet" (make_imagenet_c.py values) or "auto" (cifar when the
    shorter image side is at most 64 px). Image i draws from a generator seeded by (seed, name, severity,
    first_index + i). Grayscale images are corrupted as RGB with the grey replicated and returned as PIL's "L"
    conversion of the result. ``frost_dir`` (default: the CONVFORGE_FROST_DIR environment variable) is a folder of
    frost photographs for ``frost``. Returns a new uint8 array of the input's shape.
    """
    table = _check(images, name, severity, seed, params, first_index)
    if table == "auto":
        table = "cifar" if min(images.shape[1:3]) <= 64 else "imagenet"
    folder = frost_dir if frost_dir is not None else os.environ.get("CONVFORGE_FROST_DIR") or None
    opts = Options(table=table, frost_dir=Path(folder) if folder is not None else None)
    c = TABLES[table][name][severity - 1]
    grey = images.shape[3] == 1
    rgb = np.repeat(images, 3, axis=3) if grey else images
    n, h, w = rgb.shape[:3]
    out = np.empty(rgb.shape, dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS * _CHUNK_SCALE.get(name, 1) // max(1, h * w))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rngs = [] if name in _DETERMINISTIC else _generators(seed, name, severity, first_index + start, stop - start)
        result = _FUNCTIONS[name](rgb[start:stop], c, rngs, opts)
        out[start:stop] = np.clip(result, 0, 255).astype(np.uint8)
    return _to_grey(out) if grey else out


def _generators(seed: int, name: str, severity: int, first: int, count: int) -> list[np.random.Generator]:
    """One generator per image, seeded by (seed, crc32 of the name, severity, index)."""
    key = zlib.crc32(name.encode())
    return [np.random.default_rng([int(seed), key, int(severity), int(first) + i]) for i in range(count)]


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    """PIL's "L" conversion (ITU-R 601-2 luma, rounded) of a uint8 batch (N, H, W, 3), keeping a channel axis."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def _check(images: Any, name: Any, severity: Any, seed: Any, params: Any, first_index: Any) -> str:
    """Raise ConfigError/DataError for unusable arguments; return ``params``."""
    if name not in _FUNCTIONS:
        raise ConfigError(f"unknown corruption {name!r}; choose one of: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ConfigError(f"severity {severity!r} is not valid; choose one of: {', '.join(map(str, SEVERITIES))}")
    if params not in PARAMS:
        raise ConfigError(f"params {params!r} is not valid; choose one of: {', '.join(PARAMS)}")
    for label, value in (("seed", seed), ("first_index", first_index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"{label} must be an integer >= 0, got {value!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] not in (1, 3):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"corrupt() takes a uint8 array (N, H, W, 3) or (N, H, W, 1); got {got}")
    return str(params)
