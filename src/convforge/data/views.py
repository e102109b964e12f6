"""Views of variable-size uint8 images as fixed-size batches: RandomResizedCrop, resize + centre crop,
flips and TrivialAugmentWide, all pure tensor functions whose randomness comes from a ``torch.Generator``.

Draws and application are separate (``*_params`` / ``apply_*``) so a loader can draw the parameters of a
whole global batch and let each rank apply its own share: a sample is transformed identically whichever
rank loads it.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from convforge.data.loader import flip_where
from convforge.errors import ConfigError

CROP_ATTEMPTS = 10
TRIVIAL_AUGMENT_BINS = 31
# TrivialAugmentWide's op set, in torchvision's order.
TRIVIAL_AUGMENT_OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
    "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)
_SIGNED_OPS = frozenset(TRIVIAL_AUGMENT_OPS[1:10])

DEFAULT_CROP_PCT = 0.875  # the evaluation crop of the classic ImageNet recipe: resize 256, centre-crop 224
# Resize filters, all antialiased when shrinking (as PIL and torchvision's uint8 transforms): PyTorch's uint8
# kernels for both. Training views are bilinear; evaluation may be bicubic, as some published weights expect.
INTERPOLATIONS = ("bilinear", "bicubic")


class EvalView(NamedTuple):
    """How an image becomes its evaluation view: resized (aspect kept) to cover ``size / crop_pct`` with the
    antialiased ``interpolation`` filter, then centre-cropped to ``size`` (h, w)."""

    size: tuple[int, int]
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bilinear"


def check_interpolation(name: str) -> str:
    """``name`` if it is one of INTERPOLATIONS, else a ConfigError listing them."""
    if name not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return name


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    low, high = float(value[0]), float(value[1])
    if not 0 < low <= high:
        raise ConfigError(f"{name} must be a range (low, high) with 0 < low <= high, got {tuple(value)}")
    return low, high


def random_resized_crop_params(
    sizes: torch.Tensor,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop boxes (N, 4) as int64 (top, left, h, w) for images of ``sizes`` (N, 2: h, w).

    torchvision's ``RandomResizedCrop.get_params``, vectorised: up to 10 tries of an area share drawn
    uniformly from ``scale`` and an aspect ratio (w / h) drawn log-uniformly from ``ratio``; the first
    try whose rounded box fits is placed uniformly; if none fits, the whole image, centred and cut to
    the nearest ratio in range.
    """
    scale_lo, scale_hi = _check_range("scale", scale)
    ratio_lo, ratio_hi = _check_range("ratio", ratio)
    sizes = sizes.to(torch.int64).view(-1, 2)
    n = sizes.shape[0]
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = height * width
    target = area * (scale_lo + (scale_hi - scale_lo) * torch.rand(n, CROP_ATTEMPTS, generator=generator,
                                                                   dtype=torch.float64))
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, CROP_ATTEMPTS, generator=generator,
                                                               dtype=torch.float64))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width.long()) & (h > 0) & (h <= height.long())
    first = torch.argmax(fits.long(), dim=1, keepdim=True)  # index of the first fitting try (0 if none)
    any_fit = fits.any(dim=1)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    place = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(place[:, 0] * (sizes[:, 0] - h + 1).clamp(min=1)).long()
    left = torch.floor(place[:, 1] * (sizes[:, 1] - w + 1).clamp(min=1)).long()
    fallback = _central_crop_boxes(sizes, ratio_lo, ratio_hi)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(any_fit.view(-1, 1), boxes, fallback)


def _central_crop_boxes(sizes: torch.Tensor, ratio_lo: float, ratio_hi: float) -> torch.Tensor:
    """RandomResizedCrop's fallback: the whole image, cut to the ratio range, centred."""
    boxes = []
    for height, width in sizes.tolist():
        in_ratio = width / height
        if in_ratio < ratio_lo:
            w, h = width, int(round(width / ratio_lo))
        elif in_ratio > ratio_hi:
            h, w = height, int(round(height * ratio_hi))
        else:
            h, w = height, width
        boxes.append(((height - h) // 2, (width - w) // 2, h, w))
    return torch.tensor(boxes, dtype=torch.int64).view(-1, 4)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resize_uint8(image: torch.Tensor, size: Sequence[int], interpolation: str = "bilinear") -> torch.Tensor:
    """One uint8 (C, H, W) image resized to ``size`` (h, w): antialiased bilinear (or bicubic), computed by
    PyTorch's uint8 kernel (fixed-point, rounded; about 1.7x faster than a float round trip and no float copies).
    Returns a new uint8 (C, h, w) tensor with channels-last strides, the layout that kernel reads and writes."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image[None].clone(memory_format=torch.channels_last)[0]
    crop = image[None].contiguous(memory_format=torch.channels_last)  # no copy for an image store's whole image
    mode = check_interpolation(interpolation)
    return F.interpolate(crop, size=tuple(size), mode=mode, align_corners=False, antialias=True)[0]


def _channels_last_batch(images: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """An uninitialised uint8 (N, C, h, w) batch for ``images`` in channels-last memory."""
    if not images:
        raise ValueError("a batch of views needs at least one image")
    return torch.empty((len(images), images[0].shape[0], int(size[0]), int(size[1])), dtype=torch.uint8,
                       memory_format=torch.channels_last)


def crop_resize(images: Sequence[torch.Tensor], boxes: torch.Tensor, out_size: Sequence[int],
                flips: torch.Tensor | None = None) -> torch.Tensor:
    """Cut ``boxes`` (N, 4: top, left, h, w) out of the N uint8 (C, H, W) images, resize each to ``out_size``
    (h, w) and mirror those whose ``flips`` flag is set; returns uint8 (N, C, h, w) in channels-last memory
    (written in place: one copy of each view, no batch-wide flip or layout pass)."""
    if len(images) != boxes.shape[0]:
        raise ValueError(f"crop_resize got {len(images)} images but {boxes.shape[0]} boxes")
    out = _channels_last_batch(images, out_size)
    mirrored = [False] * len(images) if flips is None else flips.tolist()
    for i, (image, (top, left, h, w)) in enumerate(zip(images, boxes.tolist())):
        view = resize_uint8(image[:, top:top + h, left:left + w], out_size)
        out[i] = view.flip(-1) if mirrored[i] else view
    return out


def eval_resize_size(size: Sequence[int], crop_pct: float) -> tuple[int, int]:
    """The (h, w) an evaluation image is resized to cover before its centre crop of ``size``:
    ``floor(size / crop_pct)`` as timm's eval transform (224 at 0.875 -> 256); a product within 1e-6
    of an integer is taken as that integer, so crop_pct = 224/232 gives 232, not 231."""
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}: e.g. 0.875 resizes 224 to 256")
    return tuple(int(math.floor(s / crop_pct + 1e-6)) for s in size)  # type: ignore[return-value]


def resize_center_crop(image: torch.Tensor, size: Sequence[int], crop_pct: float = DEFAULT_CROP_PCT,
                       interpolation: str = "bilinear") -> torch.Tensor:
    """Evaluation view of one uint8 (C, H, W) image: resized (aspect kept, ``interpolation``) to just cover
    ``eval_resize_size(size, crop_pct)``, for a square ``size`` S that is the shorter side to
    floor(S / crop_pct), then the centre (h, w) crop. Returns uint8 (C, h, w)."""
    out_h, out_w = int(size[0]), int(size[1])
    cover_h, cover_w = eval_resize_size((out_h, out_w), crop_pct)
    height, width = image.shape[-2:]
    factor = max(cover_h / height, cover_w / width)
    # The longer side is truncated, as torchvision's Resize(int) does; the covering side stays exact.
    new_h = cover_h if cover_h / height >= cover_w / width else max(cover_h, int(height * factor))
    new_w = cover_w if cover_w / width > cover_h / height else max(cover_w, int(width * factor))
    resized = resize_uint8(image, (new_h, new_w), interpolation)
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    return resized[:, top:top + out_h, left:left + out_w]


def resize_center_crop_batch(images: Sequence[torch.Tensor], size: Sequence[int],
                             crop_pct: float = DEFAULT_CROP_PCT, interpolation: str = "bilinear") -> torch.Tensor:
    """``resize_center_crop`` of each image: uint8 (N, C, h, w) in channels-last memory."""
    out = _channels_last_batch(images, size)
    for i, image in enumerate(images):
        out[i] = resize_center_crop(image, size, crop_pct, interpolation)
    return out


def flip_params(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fair coin per image: True where the image is mirrored."""
    return torch.rand(n, generator=generator) < 0.5


def flip(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror (left-right) each image of ``batch`` (N, C, H, W) on its own coin from ``generator``."""
    return flip_where(batch, flip_params(batch.shape[0], generator).to(batch.device))


# ---- TrivialAugmentWide -------------------------------------------------------------------------------

def trivial_augment_magnitudes(op: str, bins: int = TRIVIAL_AUGMENT_BINS) -> torch.Tensor:
    """The magnitude of each of the ``bins`` levels of ``op`` in TrivialAugmentWide's wide space
    (torchvision ``TrivialAugmentWide._augmentation_space``): shear 0-0.99, translate 0-32 px,
    rotate 0-135 degrees, brightness/color/contrast/sharpness 0-0.99 (factor 1 +/- m), posterize
    8 down to 2 bits, solarize threshold 255 down to 0; the rest have no magnitude."""
    if op in ("shear_x", "shear_y", "brightness", "color", "contrast", "sharpness"):
        return torch.linspace(0.0, 0.99, bins)
    if op in ("translate_x", "translate_y"):
        return torch.linspace(0.0, 32.0, bins)
    if op == "rotate":
        return torch.linspace(0.0, 135.0, bins)
    if op == "posterize":
        return (8 - (torch.arange(bins) / ((bins - 1) / 6)).round()).float()
    if op == "solarize":
        return torch.linspace(255.0, 0.0, bins)
    if op in TRIVIAL_AUGMENT_OPS:
        return torch.zeros(bins)
    raise ConfigError(f"unknown TrivialAugment op {op!r}: use one of {', '.join(TRIVIAL_AUGMENT_OPS)}")


def trivial_augment_params(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: an op index into ``TRIVIAL_AUGMENT_OPS`` and its signed magnitude, as in the paper:
    op uniform, level uniform over 31 bins, sign a fair coin for the signed ops."""
    ops = torch.randint(len(TRIVIAL_AUGMENT_OPS), (n,), generator=generator)
    levels = torch.randint(TRIVIAL_AUGMENT_BINS, (n,), generator=generator)
    negative = torch.rand(n, generator=generator) < 0.5
    table = torch.stack([trivial_augment_magnitudes(op) for op in TRIVIAL_AUGMENT_OPS])
    magnitudes = table[ops, levels]
    signed = torch.tensor([op in _SIGNED_OPS for op in TRIVIAL_AUGMENT_OPS])[ops]
    return ops, torch.where(signed & negative, -magnitudes, magnitudes)


def apply_trivial_augment(batch: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Apply op ``ops[i]`` with ``magnitudes[i]`` to image i of the uint8 ``batch`` (N, C, H, W)."""
    out = batch.clone()
    for index, name in enumerate(TRIVIAL_AUGMENT_OPS):
        chosen = (ops == index).nonzero().flatten()
        if name != "identity" and len(chosen):
            out[chosen] = apply_op(batch[chosen], name, magnitudes[chosen])
    return out


def trivial_augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """TrivialAugmentWide (Müller & Hutter 2021, "TrivialAugment: Tuning-free Yet State-of-the-Art Data
    Augmentation"; op set and magnitude ranges from torchvision's ``TrivialAugmentWide``) on a uint8
    batch: one op per image, level uniform over 31 bins. Geometric ops use nearest sampling, fill 0."""
    ops, magnitudes = trivial_augment_params(batch.shape[0], generator)
    return apply_trivial_augment(batch, ops, magnitudes)


def apply_op(x: torch.Tensor, op: str, magnitude: torch.Tensor | float) -> torch.Tensor:
    """One TrivialAugment op on every image of the uint8 batch ``x`` (N, C, H, W), with a magnitude per
    image (or one for all). Colour ops blend in float and truncate to uint8, as torchvision does."""
    mag = torch.as_tensor(magnitude, dtype=torch.float32).flatten().expand(x.shape[0]).to(x.device)
    if op not in _OPS:
        raise ConfigError(f"unknown TrivialAugment op {op!r}: use one of {', '.join(TRIVIAL_AUGMENT_OPS)}")
    return _OPS[op](x, mag)


def _affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` at input = M @ (x_out, y_out, 1) in pixel coordinates (origin at the top-left corner,
    pixel centres at i + 0.5); nearest neighbour, zeros outside."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, h * w, 3)
    source = points @ matrices.double().transpose(1, 2)  # (N, HW, 2) input positions in pixels
    grid = torch.stack([source[..., 0] / w * 2 - 1, source[..., 1] / h * 2 - 1], dim=-1).view(n, h, w, 2)
    out = F.grid_sample(x.float(), grid.float(), mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().to(torch.uint8)


def _matrices(n: int) -> torch.Tensor:
    eye = torch.zeros(n, 2, 3, dtype=torch.float64)
    eye[:, 0, 0] = eye[:, 1, 1] = 1
    return eye


def _shear(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def shear(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        m = _matrices(x.shape[0])
        m[:, axis, 1 - axis] = mag.double()  # shear_x: x_in = x_out + m * y_out, about the top-left corner
        return _affine(x, m)
    return shear


def _translate(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def translate(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        m = _matrices(x.shape[0])
        m[:, axis, 2] = -mag.trunc().double()  # content moves by int(m) pixels right (x) or down (y)
        return _affine(x, m)
    return translate


def _rotate(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise by ``mag`` degrees about the image centre."""
    h, w = x.shape[-2:]
    theta = torch.deg2rad(mag.double())
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = w / 2, h / 2
    m = torch.zeros(x.shape[0], 2, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = cos, -sin, cx - cos * cx + sin * cy
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = sin, cos, cy - sin * cx - cos * cy
    return _affine(x, m)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x.float() + (1 - f) * other).clamp(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (N, 1, H, W), truncated to integers as torchvision's uint8 grayscale."""
    if x.shape[1] == 1:
        return x.float()
    r, g, b = x[:, 0:1].float(), x[:, 1:2].float(), x[:, 2:3].float()
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).float()


def _brightness(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros(()), 1 + mag)


def _color(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    return x.clone() if x.shape[1] == 1 else _blend(x, _gray(x), 1 + mag)


def _contrast(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, 1 + mag)


def _sharpness(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Blend with a 3x3 smoothing (centre weight 5 of 13); border pixels are never smoothed."""
    n, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x.clone()
    kernel = torch.ones(3, 3)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = x.float().clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x.float(), kernel, groups=c).round()
    return _blend(x, smooth, 1 + mag)


def _posterize(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    bits = mag.round().long().clamp(0, 8)
    masks = ((255 << (8 - bits)) & 255).to(torch.uint8).view(-1, 1, 1, 1)
    return x & masks


def _solarize(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    return torch.where(x.float() >= mag.view(-1, 1, 1, 1), 255 - x, x)


def _autocontrast(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to 0..255 (a flat channel is left as is)."""
    low = x.amin(dim=(2, 3), keepdim=True).float()
    high = x.amax(dim=(2, 3), keepdim=True).float()
    flat = high == low
    scale = torch.where(flat, torch.ones_like(low), 255.0 / (high - low).clamp(min=1))
    low = torch.where(flat, torch.zeros_like(low), low)
    return ((x.float() - low) * scale).clamp(0, 255).to(torch.uint8)


def _equalize(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel, PIL's ImageOps.equalize algorithm (as torchvision's tensor
    version): step = (pixels - count of the top value) // 255, lut[v] = (cumsum below v + step // 2) // step."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    top_value = flat.amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, top_value)) // 255
    below = torch.cumsum(hist, dim=1) - hist
    safe = step.clamp(min=1)
    lut = ((below + step // 2) // safe).clamp(0, 255)
    lut = torch.where(step == 0, torch.arange(256).expand(n * c, 256), lut)
    return lut.gather(1, flat).to(torch.uint8).view(n, c, h, w)


_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "identity": lambda x, mag: x.clone(),
    "shear_x": _shear(0), "shear_y": _shear(1),
    "translate_x": _translate(0), "translate_y": _translate(1),
    "rotate": _rotate, "brightness": _brightness, "color": _color, "contrast": _contrast,
    "sharpness": _sharpness, "posterize": _posterize, "solarize": _solarize,
    "autocontrast": _autocontrast, "equalize": _equalize,
}
