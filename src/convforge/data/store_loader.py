"""Batches from a variable-size image store, prepared ahead of the training step by background threads.

The sample order and per-rank sharding are ``ShardedLoader``'s. Each global batch's random draws
(crop boxes, flips, TrivialAugment or RandAugment ops) come from a generator seeded by (seed, epoch, global batch
index) and each rank applies the draws of its own positions, so the result does not depend on thread
timing, on where a resumed run starts, or on how many ranks share the global batch.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Protocol, Sequence

import torch

from convforge.data.loader import ShardedLoader, epoch_permutation, normalize
from convforge.data.randaugment import (
    RANDAUGMENT_MAGNITUDE,
    RANDAUGMENT_NUM_OPS,
    apply_randaugment,
    check_randaugment,
    randaugment_params,
)
from convforge.data.views import (
    EvalView,
    apply_trivial_augment,
    check_interpolation,
    crop_resize,
    flip_params,
    random_resized_crop_params,
    resize_center_crop_batch,
    trivial_augment_params,
)
from convforge.errors import ConfigError

STORE_AUGMENTS = ("trivialaugment", "randaugment")
SizeSchedule = Callable[[int], Sequence[int]]  # epoch (from 0) -> the (h, w) of that epoch's training crops


class ImageSource(Protocol):
    """What the loader needs of an image store (``convforge.data.store.ImageStore`` has it)."""

    labels: torch.Tensor
    sizes: torch.Tensor
    channels: int

    def __len__(self) -> int: ...

    def image(self, i: int) -> torch.Tensor: ...


def batch_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The generator of one global batch's random draws: a function of (seed, epoch, batch) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + batch_index + 12_345)


def progressive_step(image_size: Sequence[int]) -> int:
    """The multiple progressive crop sizes are rounded to: 32 (as FFCV's ResNet recipes) when the shorter
    side of ``image_size`` is at least 192, 16 from 64 (a 32-px step would jump from 96 to 128 at once), else 8."""
    short = min(int(v) for v in image_size)
    return 32 if short >= 192 else 16 if short >= 64 else 8


def progressive_size(epoch: int, image_size: Sequence[int], start: int, first: int, last: int) -> tuple[int, int]:
    """The training crop (h, w) of ``epoch`` (counted from 0) under progressive resizing: the shorter side is
    ``start`` up to epoch ``first`` and grows linearly to ``image_size``'s at epoch ``last`` (both counted from
    1, as epoch lines print them), each side rounded (half up) to a multiple of ``progressive_step`` (never above
    ``image_size``, never below the step); from epoch ``last`` on, ``image_size`` itself. A function of the
    epoch only, so a resumed run sees the sizes of an uninterrupted one."""
    height, width = int(image_size[0]), int(image_size[1])
    number = epoch + 1
    if number >= last:
        return height, width
    short, step = min(height, width), progressive_step((height, width))
    t = 0.0 if number <= first else (number - first) / (last - first)
    target = start + t * (short - start)  # the shorter side before rounding
    return tuple(min(side, max(step, math.floor(target * side / short / step + 0.5) * step))  # type: ignore[return-value]
                 for side in (height, width))


def train_views(images: list[torch.Tensor], sizes: torch.Tensor, size: tuple[int, int], gen: torch.Generator, *,
                scale: Sequence[float], ratio: Sequence[float], flip: bool, augment: str | None,
                randaugment: tuple[int, int], positions: slice = slice(None)) -> torch.Tensor:
    """RandomResizedCrop (+ flip, + TrivialAugment or RandAugment) uint8 views of ``images``, the ``positions``
    of a batch whose image sizes are ``sizes`` (h, w): every draw is made for the whole batch, in that order
    (later draws are appended, so earlier ones never change), so each share of it gets the same views."""
    boxes = random_resized_crop_params(sizes, scale, ratio, gen)
    flips = flip_params(len(sizes), gen)
    ops, magnitudes = trivial_augment_params(len(sizes), gen)
    x = crop_resize(images, boxes[positions], size, flips[positions] if flip else None)
    if augment == "trivialaugment":
        x = apply_trivial_augment(x, ops[positions], magnitudes[positions])
    elif augment == "randaugment":
        ra_ops, ra_magnitudes = randaugment_params(len(sizes), *randaugment, size, gen)
        x = apply_randaugment(x, ra_ops[positions], ra_magnitudes[positions])
    return x


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"{name} must be a positive size or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def scheduled_crop_size(image_size: tuple[int, int], size_schedule: SizeSchedule | None,
                        epoch: int) -> tuple[int, int]:
    """The (h, w) of the training views of ``epoch``: ``image_size``, or the progressive schedule's size."""
    if size_schedule is None:
        return image_size
    return _pair(tuple(int(v) for v in size_schedule(epoch)), "the progressive crop size")


class StoreLoader(ShardedLoader):
    """Iterates over an image store in batches ``(x, y)``: x float normalised (N, C, h, w) on ``device``,
    y int64. Training views are RandomResizedCrop (+ flip, + TrivialAugment or RandAugment); evaluation views
    (``train=False``) are resize + centre crop, in store order, with the last partial batch kept.

    ``prefetch`` batches are prepared by as many background threads (0: on the consumer's thread);
    memory is bounded by ``prefetch + 1`` batches. On CUDA, batches are pinned and copied per batch
    with ``non_blocking``; normalisation then runs on the device. ``center``: training order (shuffled,
    last partial batch dropped) with evaluation views, no random crop, flip or augmentation.
    ``randaugment`` = (N, M): RandAugment's ops per image and magnitude level (``augment="randaugment"``).
    ``size_schedule(epoch)``: the training crop size of each epoch (progressive resizing; default:
    ``image_size`` throughout), a pure function of the epoch so that a resumed run sees the same sizes.
    ``interpolation``: the resize filter of the evaluation views (training crops are bilinear).
    """

    def __init__(
        self,
        store: ImageSource,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        image_size: int | Sequence[int],
        crop_pct: float = 0.875,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip: bool = True,
        augment: str | None = None,
        center: bool = False,
        shuffle: bool | None = None,
        drop_last: bool | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        randaugment: Sequence[int] = (RANDAUGMENT_NUM_OPS, RANDAUGMENT_MAGNITUDE),
        size_schedule: SizeSchedule | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if augment not in (None, *STORE_AUGMENTS):
            raise ConfigError(f"unknown store augment {augment!r}: use None or one of {', '.join(STORE_AUGMENTS)}")
        if prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0 batches, got {prefetch}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if not train and (shuffle or drop_last):
            raise ConfigError("an evaluation loader (train=False) keeps the store order and every sample: "
                              "leave shuffle and drop_last unset")
        if len(mean) != store.channels or len(std) != store.channels:
            raise ConfigError(f"mean/std have {len(mean)}/{len(std)} values for a {store.channels}-channel "
                              "store: give one per channel")
        self.store = store
        self.batch_size, self.mean, self.std = batch_size, tuple(mean), tuple(std)
        self.train, self.image_size = train, _pair(image_size, "image_size")
        self.scale, self.ratio, self.flip, self.augment = tuple(scale), tuple(ratio), flip, augment
        self.center = center
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = train if drop_last is None else drop_last
        self.seed, self.device, self.channels_last = seed, torch.device(device), channels_last
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.randaugment = (int(randaugment[0]), int(randaugment[1]))
        self.size_schedule = size_schedule
        self.eval_view = EvalView(self.image_size, crop_pct, check_interpolation(interpolation))
        self.pin_memory = self.device.type == "cuda"  # page-locked host batches: asynchronous copies
        self.epoch = 0
        self.last_indices = torch.empty(0, dtype=torch.long)
        if train:  # fail now, not in a worker thread, on a bad scale, ratio, RandAugment or size schedule
            random_resized_crop_params(torch.ones(1, 2, dtype=torch.long), self.scale, self.ratio)
            check_randaugment(*self.randaugment)
            self.crop_size(0)

    def crop_size(self, epoch: int | None = None) -> tuple[int, int]:
        """The (h, w) of the training views of ``epoch`` (default: the current one)."""
        return scheduled_crop_size(self.image_size, self.size_schedule, self.epoch if epoch is None else epoch)

    def epoch_record(self) -> dict[str, list[int]]:
        """What the epoch record says of this loader's epoch: ``train_size`` [h, w] of its training views."""
        return {"train_size": list(self.crop_size())} if self.train else {}

    def _global_batches(self) -> list[torch.Tensor]:
        """The epoch's global batches (``batch_size * world_size`` samples), as ``shard`` cuts them."""
        n = len(self.store)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        global_batch = self.batch_size * self.world_size
        if self.drop_last and self.shuffle:
            order = order[: n // global_batch * global_batch]
        return [order[s:s + global_batch] for s in range(0, n, global_batch) if len(order[s:s + global_batch])]

    def _batches(self) -> list[torch.Tensor]:
        return [g[self.rank::self.world_size] for g in self._global_batches() if len(g[self.rank::self.world_size])]

    def clean_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The evaluation view (resize + centre crop), normalised, of the samples at ``indices``."""
        x = resize_center_crop_batch([self.store.image(int(i)) for i in indices], *self.eval_view)
        return self._finish(x.to(self.device))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return normalize(x, self.mean, self.std, layout)

    def make_batch(self, epoch: int, batch_index: int,
                   global_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``batch_index`` of ``epoch`` on the host: uint8 (N, C, h, w)
        views and int64 labels (normalised float instead when the device is the CPU; pinned on CUDA)."""
        positions = slice(self.rank, None, self.world_size)
        indices = global_indices[positions]
        images = [self.store.image(int(i)) for i in indices]
        size = self.crop_size(epoch) if self.train else self.image_size
        if self.train and not self.center:
            x = self._train_views(images, epoch, batch_index, global_indices, positions, size)
        else:
            x = resize_center_crop_batch(images, *self.eval_view._replace(size=size))
        y = self.store.labels[indices].to(torch.int64)
        if self.device.type == "cpu":
            return self._finish(x), y
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _train_views(self, images: list[torch.Tensor], epoch: int, batch_index: int, global_indices: torch.Tensor,
                     positions: slice, size: tuple[int, int]) -> torch.Tensor:
        """This rank's training views, from the draws of the whole global batch."""
        return train_views(images, self.store.sizes[global_indices], size, batch_generator(self.seed, epoch, batch_index),
                           scale=self.scale, ratio=self.ratio, flip=self.flip, augment=self.augment,
                           randaugment=self.randaugment, positions=positions)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            return x, y
        return self._finish(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from ``start_batch`` on (earlier ones are skipped, not computed).

        ``last_indices`` holds the sample indices of the batch last yielded. An error while preparing a
        batch is raised here, in the consumer; leaving the loop early stops the threads. The epoch is
        read now: a later ``set_epoch`` does not reach the batches of this pass."""
        jobs = list(enumerate(self._global_batches()))[start_batch:]
        jobs = [(self.epoch, k, g) for k, g in jobs if len(g[self.rank::self.world_size])]
        return self._prefetched(jobs) if self.prefetch > 0 else self._in_turn(jobs)

    def _in_turn(self, jobs: list[tuple[int, int, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for epoch, k, g in jobs:
            x, y = self.make_batch(epoch, k, g)
            self.last_indices = g[self.rank::self.world_size]
            yield self._to_device(x, y)

    def _prefetched(self, jobs: list[tuple[int, int, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="convforge-store-loader")
        pending: deque[tuple[torch.Tensor, Future]] = deque()
        remaining = iter(jobs)

        def submit_next() -> None:
            job = next(remaining, None)
            if job is not None:
                pending.append((job[2], pool.submit(self.make_batch, *job)))

        try:
            for _ in range(self.prefetch):
                submit_next()
            while pending:
                g, future = pending.popleft()
                x, y = future.result()
                submit_next()
                self.last_indices = g[self.rank::self.world_size]
                yield self._to_device(x, y)
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
