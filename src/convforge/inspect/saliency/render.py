"""Saliency pictures: a map blended over its image with a jet-like colour map, and a grid of several maps."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def normalised(saliency: Any) -> np.ndarray:
    """A map rescaled to [0, 1] (a constant map: all zeros); NaNs count as the minimum."""
    array = np.nan_to_num(_array(saliency).astype(np.float64), nan=-np.inf)
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return np.zeros(array.shape)
    array = np.clip(array, finite.min(), finite.max())
    span = finite.max() - finite.min()
    return (array - finite.min()) / span if span > 0 else np.zeros(array.shape)


def rgb(image: Any) -> np.ndarray:
    """A uint8 (H, W, 3) copy of an (H, W), (H, W, 1) or (H, W, 3) image."""
    array = _array(image)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {array.shape}")
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3].copy()


def overlay(image_uint8_hwc: Any, saliency_hw: Any, alpha: float = 0.5, cmap: str = "jet") -> Any:
    """The map (resized bilinearly to the image when it differs) coloured by ``cmap`` and blended over the
    image at ``alpha``, as a PIL RGB image; 1-channel images are shown in grey."""
    from matplotlib import colormaps
    from PIL import Image

    base = rgb(image_uint8_hwc)
    heat = normalised(saliency_hw)
    if heat.shape != base.shape[:2]:
        resized = Image.fromarray(heat.astype(np.float32), mode="F").resize(base.shape[1::-1], Image.BILINEAR)
        heat = np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)
    colour = colormaps[cmap](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * base.astype(np.float64) + alpha * colour
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")


def grid(image_uint8_hwc: Any, maps: Mapping[str, Any], tile: int = 128, alpha: float = 0.5) -> Any:
    """One row: the image, then each map's overlay, every tile scaled to ``tile`` pixels high and captioned."""
    from PIL import Image, ImageDraw

    base = rgb(image_uint8_hwc)
    height, width = base.shape[:2]
    scale = tile / height
    size = (max(1, round(width * scale)), tile)
    tiles = [("image", Image.fromarray(base, mode="RGB"))]
    tiles += [(name, overlay(base, saliency, alpha)) for name, saliency in maps.items()]
    caption = 14
    canvas = Image.new("RGB", (len(tiles) * (size[0] + 4) + 4, tile + caption + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (name, picture) in enumerate(tiles):
        left = 4 + i * (size[0] + 4)
        canvas.paste(picture.resize(size, Image.NEAREST if scale >= 2 else Image.BILINEAR), (left, caption + 4))
        draw.text((left, 2), name, fill=(0, 0, 0))
    return canvas


def png_bytes(picture: Any) -> bytes:
    """A PIL image encoded as PNG."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | Path, picture: Any) -> Path:
    """Write a PIL image as a PNG file atomically."""
    from convforge.fileio import atomic_write_bytes

    return atomic_write_bytes(path, png_bytes(picture))


def write_grid(path: str | Path, image_uint8_hwc: Any, maps: Mapping[str, Any], tile: int = 128) -> Path:
    """Write :func:`grid` of ``image`` and ``maps`` (method name -> (H, W) map) as a PNG file atomically."""
    return write_png(path, grid(image_uint8_hwc, maps, tile))
