"""Segmenting one image and showing the result: class masks, colour palettes, overlays, palette PNGs.

The pieces of ``convforge segment CKPT IMAGE --out mask.png``::

    mask = segment_image(model, image, mean, std)          # uint8 (H, W) class indices
    colours = palette_for(classes)                          # CamVid's colours for CamVid's classes
    save_mask(path, mask, colours)                          # palette PNG: indices + colours
    picture = overlay(image, mask, alpha=0.5, palette=colours)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from convforge.data.dataset import convert_channels
from convforge.data.loader import normalize

# The colours of the SegNet CamVid labels (Brostow et al.'s colour coding of these classes); void is black.
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
CAMVID_COLOURS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))


def default_palette(size: int = 256) -> torch.Tensor:
    """``size`` distinct colours, uint8 (size, 3): the PASCAL VOC colour map (bits of the index spread
    over the high bits of R, G and B), so index 0 is black and neighbouring indices differ clearly."""
    palette = torch.zeros(size, 3, dtype=torch.uint8)
    for index in range(size):
        value, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[index] = torch.tensor(rgb, dtype=torch.uint8)
    return palette


def palette_for(classes: Sequence[str]) -> torch.Tensor:
    """A 256-colour uint8 palette for ``classes``: CamVid's own colours when the classes are CamVid's
    11 (case-insensitive), otherwise :func:`default_palette`."""
    palette = default_palette()
    if [c.lower() for c in classes] == [c.lower() for c in CAMVID_CLASSES]:
        palette[: len(CAMVID_COLOURS)] = torch.tensor(CAMVID_COLOURS, dtype=torch.uint8)
        palette[len(CAMVID_COLOURS):] = 0
    return palette


@torch.no_grad()
def segment_image(model: nn.Module, image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Class index of every pixel of one uint8 image (C, H, W): uint8 (H, W), on the CPU.

    The image is converted to ``len(mean)`` channels (gray <-> RGB), normalised, and run through the
    model in eval mode on the model's device; the model must return (1, K, H', W') logits (resized
    to H x W if they differ) with K <= 256.
    """
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"image must be uint8 (C, H, W), got {image.dtype} {tuple(image.shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = normalize(convert_channels(image[None], len(mean)).to(device), mean, std)
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
    if logits.ndim != 4 or logits.shape[0] != 1:
        raise ValueError(f"the model returned {tuple(logits.shape)}, not (1, classes, H, W) logits: is it a segmentation model?")
    if logits.shape[1] > 256:
        raise ValueError(f"{logits.shape[1]} classes do not fit a uint8 mask")
    if logits.shape[-2:] != image.shape[-2:]:
        logits = torch.nn.functional.interpolate(logits.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].to(torch.uint8).cpu()


def colorize(mask: torch.Tensor, palette: torch.Tensor | None = None) -> torch.Tensor:
    """A class-index mask (H, W) as a uint8 RGB picture (3, H, W) through ``palette`` (K, 3), by
    default :func:`default_palette`; values past the palette's end are black."""
    palette = default_palette() if palette is None else torch.as_tensor(palette, dtype=torch.uint8)
    index = mask.long()
    outside = (index < 0) | (index >= palette.shape[0])
    rgb = palette[index.clamp(0, palette.shape[0] - 1)]
    rgb[outside] = 0
    return rgb.permute(2, 0, 1).contiguous()


def overlay(
    image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5, palette: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """The image (uint8 (C, H, W), gray or RGB) blended with the coloured mask: ``(1 - alpha) * image +
    alpha * colour``, uint8 (3, H, W); pixels whose mask is ``ignore_index`` keep the image."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"image of size {tuple(image.shape[-2:])} but mask of size {tuple(mask.shape[-2:])}")
    rgb = convert_channels(image[None], 3)[0].float()
    colours = colorize(mask, palette).float()
    blended = (1.0 - alpha) * rgb + alpha * colours
    if ignore_index is not None:
        blended = torch.where((mask == ignore_index)[None], rgb, blended)
    return blended.round().clamp(0, 255).to(torch.uint8)


def save_mask(path: str | Path, mask: torch.Tensor, palette: torch.Tensor | None = None) -> Path:
    """Write a uint8 mask (H, W) as a palette PNG: its pixel indices are the classes (``segfolder``
    reads them back as such) and its colours are ``palette`` (default :func:`default_palette`)."""
    path = Path(path)
    palette = default_palette() if palette is None else torch.as_tensor(palette, dtype=torch.uint8)
    colours = torch.zeros(256, 3, dtype=torch.uint8)
    colours[: min(256, palette.shape[0])] = palette[:256]
    picture = Image.fromarray(np.ascontiguousarray(mask.to(torch.uint8).numpy()))  # mode L
    picture.putpalette(colours.flatten().tolist())  # L -> P, keeping the pixel values as indices
    picture.save(path)
    return path
