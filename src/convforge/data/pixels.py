"""Pixel conventions every image decoder of convforge shares (``imagefolder`` caches and ``store`` image stores).

- EXIF orientation is applied, so that a phone's portrait photo is portrait;
- 16- and 32-bit grayscale is scaled to 8 bits (65535 -> 255), not clipped;
- transparency (alpha, or a palette/colour key) is composited on white.

This module imports no other part of ``convforge.data``, so both decoders can use it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees
ORIENTATION_TAG = 0x0112


def header_orientation(img: Image.Image) -> int:
    """The EXIF orientation stored in the header (1 when there is none), without decoding pixels."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    value = exif.get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``img`` once its header's EXIF orientation is applied."""
    return img.size[::-1] if header_orientation(img) in SWAPPING_ORIENTATIONS else img.size


def apply_orientation(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation (``img`` itself when it has none)."""
    orientation = img.getexif().get(ORIENTATION_TAG, 1)
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img


def to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grayscale to 8-bit by scaling (65535 -> 255), not clipping; float images are clipped."""
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    high = np.asarray(img, dtype=np.float64)
    scale = 1.0 if img.mode == "F" else 256.0
    return Image.fromarray(np.clip(np.nan_to_num(high / scale), 0, 255).astype(np.uint8), "L")


def flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent images on white (under transparent pixels lie arbitrary colours, often black)."""
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("LA" if img.mode == "L" else "RGBA")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode not in ("LA", "RGBA"):
        return img
    base = img.mode[:-1]
    flat = Image.new(base, img.size, "white")
    flat.paste(img.convert(base), mask=img.getchannel("A"))
    return flat
