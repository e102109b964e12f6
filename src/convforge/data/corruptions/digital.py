"""Digital corruptions: brightness, contrast, elastic_transform, pixelate, jpeg_compression."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image
from scipy import ndimage

from convforge.data.corruptions import _ops
from convforge.data.corruptions._ops import Options


def brightness(x: np.ndarray, c: float, rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Add ``c`` to the HSV value (clipped to [0, 1])."""
    hsv = rgb_to_hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv_to_rgb(hsv), 0, 1) * 255


def contrast(x: np.ndarray, c: float, rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Map every value to (x - mean) * c + mean, the mean per image and channel."""
    xf = x / 255.0
    means = xf.mean(axis=(1, 2), keepdims=True)
    return np.clip((xf - means) * c + means, 0, 1) * 255


def elastic_transform(x: np.ndarray, c: tuple[float, float, float], rngs: list[np.random.Generator],
                      opts: Options) -> np.ndarray:
    """A random affine warp (three points moved by U(-c[2], c[2]) px, reflect-101 border), then a displacement
    field of U(-1, 1) noise smoothed with sigma c[1] (reflect, truncate 3) and scaled by alpha c[0], both bilinear."""
    alpha, sigma, jitter = c
    n, h, w, channels = x.shape
    centre, size = np.array([w // 2, h // 2], dtype=np.float64), min(h, w) // 3
    points = np.array([centre + size, [centre[0] + size, centre[1] - size], centre - size], dtype=np.float32)
    moves, fields = np.empty((n, 3, 2), dtype=np.float32), np.empty((n, 2, h, w))
    for i, rng in enumerate(rngs):
        moves[i] = rng.uniform(-jitter, jitter, size=(3, 2))
        fields[i, 0] = rng.uniform(-1, 1, size=(h, w))
        fields[i, 1] = rng.uniform(-1, 1, size=(h, w))
    moved = points[None] + moves
    ones = np.ones((n, 3, 1))
    # The affine that maps the moved points back onto the originals gives, for each output pixel, where to read.
    back = np.linalg.solve(np.concatenate([moved, ones], axis=2).astype(np.float64), np.broadcast_to(points, (n, 3, 2)))
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_x = cols * back[:, 0, 0, None, None] + rows * back[:, 1, 0, None, None] + back[:, 2, 0, None, None]
    src_y = cols * back[:, 0, 1, None, None] + rows * back[:, 1, 1, None, None] + back[:, 2, 1, None, None]
    batch = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], (n, h, w))
    xf = x.astype(np.float32) / 255.0
    warped = _per_channel(xf, [batch, src_y, src_x], "mirror")
    dx = (_ops.gaussian_hw(fields[:, 0], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (_ops.gaussian_hw(fields[:, 1], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    out = _per_channel(warped, [batch, rows + dy, cols + dx], "reflect")
    return np.clip(out, 0, 1) * 255


def _per_channel(images: np.ndarray, coords: list[np.ndarray], mode: str) -> np.ndarray:
    """Bilinear sampling of every channel of a batch (N, H, W, C) at (image, row, col) coordinates (N, H, W)."""
    chans = [ndimage.map_coordinates(images[..., k], coords, order=1, mode=mode) for k in range(images.shape[3])]
    return np.stack(chans, axis=-1)


def pixelate(x: np.ndarray, c: float, rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Box-downsample to int(size * c), then box-upsample back (PIL)."""
    h, w = x.shape[1:3]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    out = np.empty_like(x)
    for i, image in enumerate(x):
        im = Image.fromarray(image).resize(small, Image.Resampling.BOX)
        out[i] = np.asarray(im.resize((w, h), Image.Resampling.BOX))
    return out


def jpeg_compression(x: np.ndarray, c: int, rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Encode as JPEG of quality ``c`` with PIL's defaults, and decode."""
    out = np.empty_like(x)
    for i, image in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out
