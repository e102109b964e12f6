"""Batches from uint8 tensors, with augmentations applied to whole batches (no per-image Python loop)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from convforge.data.dataset import Split
from convforge.errors import ConfigError

AUGMENTS = ("none", "flip", "crop", "crop-flip", "crop-altflip")


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global sample order of one epoch: a function of (seed, epoch) only, so runs and ranks agree."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


def shard(indices: torch.Tensor, batch_size: int, rank: int, world_size: int, drop_last: bool) -> list[torch.Tensor]:
    """Cut ``indices`` into global batches of ``batch_size * world_size`` and give each rank its interleaved share.

    The union over ranks of the k-th per-rank batch is exactly the k-th global batch, so a run on
    N processes with batch b sees the same samples per step as one process with batch N*b.
    """
    global_batch = batch_size * world_size
    if drop_last:
        indices = indices[: len(indices) // global_batch * global_batch]
    batches = []
    for start in range(0, len(indices), global_batch):
        chunk = indices[start:start + global_batch]
        batches.append(chunk[rank::world_size])
    return [b for b in batches if len(b)]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 or [0, 255] float images -> ``(x / 255 - mean) / std`` as float32 (N, C, H, W) laid out in
    ``memory_format``: conversion, scaling and any change of layout in one pass over the pixels."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=x.device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=x.device).view(1, -1, 1, 1)
    out = torch.empty(torch.broadcast_shapes(shift.shape, x.shape), device=x.device, memory_format=memory_format)
    return torch.addcmul(shift, x if x.dtype == torch.uint8 else x.float(), scale, out=out)


def random_crop(x: torch.Tensor, padding: int, offsets: torch.Tensor, pad_mode: str = "zeros") -> torch.Tensor:
    """Pad every image by ``padding`` pixels (zeros, or ``pad_mode="reflect"``: mirrored without repeating the
    edge) and crop back at per-image ``offsets`` (N, 2) in [0, 2*padding]."""
    n, c, h, w = x.shape
    if pad_mode == "reflect":
        rows = _reflect(offsets[:, 0:1] - padding + torch.arange(h, device=x.device), h)
        cols = _reflect(offsets[:, 1:2] - padding + torch.arange(w, device=x.device), w)
        picked = x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w))
        return picked.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    picked = padded.gather(2, rows)
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return picked.gather(3, cols)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside 0..size-1 mirrored back inside (edge not repeated), as ``F.pad(mode="reflect")`` does."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def alternating_flips(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """airbench94's alternating flip: a per-run random flip per image, inverted on every odd epoch, so each
    image is seen both ways in every pair of epochs (random flipping repeats a side half the time)."""
    base = torch.rand(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + 4_242_424)) < 0.5
    return base ^ bool(epoch % 2)


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose ``flip`` flag is set."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


class ShardedLoader:
    """What every convforge loader shares: the epoch's sample order, a function of (seed, epoch) only,
    cut into per-rank batches. Subclasses set ``images``, ``batch_size``, ``shuffle``, ``drop_last``,
    ``seed``, ``rank``, ``world_size`` and ``epoch``, and implement ``iter_from(start_batch)``."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[torch.Tensor]:
        n = self.images.shape[0]
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        return shard(order, self.batch_size, self.rank, self.world_size, self.drop_last and self.shuffle)

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class BatchLoader(ShardedLoader):
    """Iterates over a split in batches of normalised float tensors on ``device``.

    Sampling and augmentation draws depend only on (seed, epoch), never on global RNG state,
    so a resumed run repeats the same batches, and ``rank``/``world_size`` shard the samples.
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
        crop_padding: int = 4,
        pad_mode: str = "zeros",
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if augment not in AUGMENTS:
            raise ConfigError(f"unknown augment {augment!r}: use one of {', '.join(AUGMENTS)}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        images = split.images
        if self.device.type != "cpu":
            images = images.to(self.device, non_blocking=True)  # the whole uint8 split lives on the accelerator
        self.images, self.labels = images, split.labels.to(self.device)
        self.batch_size, self.mean, self.std = batch_size, tuple(mean), tuple(std)
        self.shuffle, self.augment, self.crop_padding, self.pad_mode = shuffle, augment, crop_padding, pad_mode
        self.drop_last, self.seed, self.channels_last = drop_last, seed, channels_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.last_indices = torch.empty(0, dtype=torch.long)

    def clean_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The un-augmented, normalised images at ``indices`` (e.g. a teacher's view)."""
        x = normalize(self.images[indices.to(self.images.device)], self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from ``start_batch`` on (earlier ones are skipped, not computed).

        ``last_indices`` holds the sample indices of the batch last yielded."""
        n = self.images.shape[0]
        h, w = self.images.shape[2:]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_777_777)
        # Augmentation draws are per sample index (not per batch position) so sharding does not change them.
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        if self.augment == "crop-altflip":
            flips = alternating_flips(n, self.seed, self.epoch)
        for idx in self._batches()[start_batch:]:
            self.last_indices = idx
            x = self.images[idx.to(self.images.device)] if self.device.type != "cpu" else self.images[idx]
            y = self.labels[idx.to(self.labels.device)]
            if self.augment in ("crop", "crop-flip", "crop-altflip") and self.crop_padding > 0 and min(h, w) > 1:
                x = random_crop(x, self.crop_padding, offsets[idx].to(x.device), self.pad_mode)
            if self.augment in ("flip", "crop-flip", "crop-altflip"):
                x = flip_where(x, flips[idx].to(x.device))
            x = normalize(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
