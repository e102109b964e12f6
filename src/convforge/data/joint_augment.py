"""Joint image/mask augmentation for segmentation (random scale, crop, horizontal flip) and its loader.

Every output pixel (i, j) of a crop is mapped to one source coordinate (y, x) of the original
image; the image is sampled there bilinearly and the mask by nearest neighbour (the source pixel
``floor(y + 0.5), floor(x + 0.5)``), so image and mask stay aligned pixel for pixel. Where the crop
leaves the (scaled) image the image is 0 and the mask ``ignore_index``. Everything is batched:
one ``grid_sample`` for the images and one gather for the masks, no per-image Python loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from convforge.data.dataset import Split
from convforge.data.loader import ShardedLoader, flip_where, normalize
from convforge.errors import ConfigError

# "crop": random crops of ``crop`` size at scale 1; "scale-crop-flip": random scale in ``scales``, then crop, then flip.
SEG_AUGMENTS = ("none", "flip", "crop", "crop-flip", "scale-crop-flip")
DEFAULT_SCALES = (0.5, 2.0)


@dataclass
class JointParams:
    """Per-sample draws: ``scale`` (N,) factor, ``offset`` (N, 2) integer top/left of the crop in the
    scaled image (negative or past the end where the crop is larger than the image), ``flip`` (N,) bool."""

    scale: torch.Tensor
    offset: torch.Tensor
    flip: torch.Tensor

    def __getitem__(self, index: torch.Tensor) -> JointParams:
        return JointParams(self.scale[index], self.offset[index], self.flip[index])


def draw_params(
    num: int,
    image_size: tuple[int, int],
    *,
    scales: tuple[float, float],
    crop: tuple[int, int],
    flip: bool,
    generator: torch.Generator | None = None,
) -> JointParams:
    """Draw scale (uniform in ``scales``), crop offset (uniform over the positions where the crop and
    the scaled image overlap as much as they can) and flip (probability 1/2 when ``flip``) per sample."""
    low, high = scales
    if not 0 < low <= high:
        raise ConfigError(f"scales must satisfy 0 < low <= high, got {scales}")
    scale = low + (high - low) * torch.rand(num, generator=generator, dtype=torch.float64)
    u = torch.rand(num, 2, generator=generator, dtype=torch.float64)
    flips = torch.rand(num, generator=generator) < 0.5
    offsets = []
    for axis in range(2):
        extent = torch.round(image_size[axis] * scale)  # the scaled image's side in pixels
        slack = extent - crop[axis]  # > 0: the crop fits in several places; < 0: padding is needed
        first = torch.minimum(slack, torch.zeros_like(slack))
        count = slack.abs() + 1
        offsets.append(first + torch.floor(u[:, axis] * count).clamp_max(count - 1))
    offset = torch.stack(offsets, 1).long()
    return JointParams(scale.float(), offset, flips if flip else torch.zeros(num, dtype=torch.bool))


def apply_joint(
    images: torch.Tensor,
    masks: torch.Tensor,
    params: JointParams,
    crop: tuple[int, int],
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply drawn ``params`` to float images (N, C, H, W) and integer masks (N, H, W); returns float
    images (N, C, *crop) and int64 masks (N, *crop)."""
    n, _, h, w = images.shape
    if masks.shape != (n, h, w):
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not match images of shape {tuple(images.shape)}")
    device = images.device
    ch, cw = crop
    scale = params.scale.to(device=device, dtype=torch.float32).view(n, 1)
    offset = params.offset.to(device)
    # Source coordinate (pixel units, pixel centres at integers) of every output row and column.
    ys = (offset[:, 0:1] + torch.arange(ch, device=device) + 0.5) / scale - 0.5  # (N, ch)
    xs = (offset[:, 1:2] + torch.arange(cw, device=device) + 0.5) / scale - 0.5  # (N, cw)
    xs = torch.where(params.flip.to(device).view(n, 1), xs.flip(1), xs)
    inside_y = (ys >= -0.5) & (ys < h - 0.5)
    inside_x = (xs >= -0.5) & (xs < w - 0.5)
    inside = inside_y[:, :, None] & inside_x[:, None, :]  # (N, ch, cw)
    # Images: bilinear, clamped at the border (so the half pixel at the edge repeats the edge pixel,
    # as the nearest-neighbour mask does), then 0 outside the image.
    grid = torch.empty(n, ch, cw, 2, device=device)
    grid[..., 0] = ((2 * xs + 1) / w - 1)[:, None, :]
    grid[..., 1] = ((2 * ys + 1) / h - 1)[:, :, None]
    out_images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    outside = ~inside
    out_images.masked_fill_(outside[:, None], 0.0)
    # Masks: nearest source pixel, by index arithmetic (exact, no floating-point interpolation of labels).
    iy = torch.floor(ys + 0.5).long().clamp_(0, h - 1)
    ix = torch.floor(xs + 0.5).long().clamp_(0, w - 1)
    flat = (iy[:, :, None] * w + ix[:, None, :]).view(n, -1)
    out_masks = masks.reshape(n, h * w).gather(1, flat).view(n, ch, cw).long()
    out_masks.masked_fill_(outside, ignore_index)
    return out_images, out_masks


def joint_augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    scales: tuple[float, float] = DEFAULT_SCALES,
    crop: tuple[int, int] | None = None,
    flip: bool = True,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale, crop (``crop`` = (H, W), default the input size) and horizontal flip, drawn per
    sample from ``generator`` and applied identically to float ``images`` (N, C, H, W) and ``masks``
    (N, H, W). Returns (float images, int64 masks); padding is 0 in images, ``ignore_index`` in masks."""
    size = (images.shape[2], images.shape[3])
    crop = tuple(crop) if crop is not None else size  # type: ignore[assignment]
    params = draw_params(images.shape[0], size, scales=scales, crop=crop, flip=flip, generator=generator)
    return apply_joint(images, masks, params, crop, ignore_index)


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ConfigError(f"{name} must be a positive integer or a (height, width) pair, got {value!r}")
    return pair  # type: ignore[return-value]


class SegmentationLoader(ShardedLoader):
    """Batches of (normalised float32 images, int64 masks) from a split with (N, H, W) masks.

    The interface is :class:`~convforge.data.loader.BatchLoader`'s. ``augment`` is one of
    ``SEG_AUGMENTS``: "flip"; "crop" (random ``crop``-sized windows at scale 1); "crop-flip";
    "scale-crop-flip" (scale uniform in ``scales``, then crop and flip). ``crop`` defaults to the
    image size. Sample order and every augmentation draw depend only on (seed, epoch, sample index),
    never on global RNG state or the rank, so a resumed or sharded run repeats the same batches.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        shuffle: bool = False,
        augment: str = "none",
        scales: tuple[float, float] = DEFAULT_SCALES,
        crop: int | tuple[int, int] | None = None,
        ignore_index: int = 255,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if augment not in SEG_AUGMENTS:
            raise ConfigError(f"unknown segmentation augment {augment!r}: use one of {', '.join(SEG_AUGMENTS)}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if split.labels.ndim != 3:
            raise ConfigError("SegmentationLoader needs a split with (N, H, W) masks as labels")
        if not 0 < scales[0] <= scales[1]:
            raise ConfigError(f"scales must satisfy 0 < low <= high, got {tuple(scales)}")
        self.device = torch.device(device)
        images, masks = split.images, split.labels
        if self.device.type != "cpu":
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
        self.images, self.masks = images, masks
        self.batch_size, self.mean, self.std = batch_size, tuple(mean), tuple(std)
        self.shuffle, self.augment = shuffle, augment
        self.scales = (float(scales[0]), float(scales[1])) if augment == "scale-crop-flip" else (1.0, 1.0)
        self.image_size = (int(images.shape[2]), int(images.shape[3]))
        self.crop = _pair(crop, "crop") or self.image_size
        self.ignore_index = ignore_index
        self.drop_last, self.seed, self.channels_last = drop_last, seed, channels_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.last_indices = torch.empty(0, dtype=torch.long)

    @property
    def labels(self) -> torch.Tensor:
        """The masks (as ``BatchLoader.labels``)."""
        return self.masks

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def clean_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The un-augmented, normalised images at ``indices``."""
        return self._finish(self.images[indices.to(self.images.device)])

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from ``start_batch`` on (earlier ones are skipped, not computed);
        ``last_indices`` holds the sample indices of the batch last yielded."""
        n = self.images.shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_777_777)
        geometric = self.augment in ("crop", "crop-flip", "scale-crop-flip")
        flip = self.augment in ("flip", "crop-flip", "scale-crop-flip")
        # Drawn for every sample index (not per batch position), so sharding and resuming do not change them.
        params = draw_params(n, self.image_size, scales=self.scales, crop=self.crop, flip=flip, generator=gen)
        for idx in self._batches()[start_batch:]:
            self.last_indices = idx
            where = idx.to(self.images.device)
            x, y = self.images[where], self.masks[where]
            if geometric:
                x, y = apply_joint(x.float(), y, params[idx], self.crop, self.ignore_index)
            else:
                y = y.long()
                if flip:
                    flips = params.flip[idx].to(x.device)
                    x = flip_where(x, flips)
                    y = torch.where(flips.view(-1, 1, 1), y.flip(2), y)
            yield self._finish(x), y
