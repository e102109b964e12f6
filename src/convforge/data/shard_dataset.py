"""WebDataset shards as a data set (``wds:DIR`` with ``--store-size``): what the engine reads of a ``PhotoDataset``.

The splits are known from the shard files (their sample counts from ``classes.json``, else counted once);
images are decoded as an image store keeps them (:mod:`convforge.data.shards`), so training crops, evaluation
views and the checkpoint's recorded ``preprocess`` are those of ``imagefolder:DIR`` store data, and a model
evaluated on the shards or on the image folder they were written from scores the same. The normalisation
statistics are measured on a seeded sample of ``STATS_SAMPLES`` training images (their evaluation views at the
training crop size), since the shards are read as a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from convforge.data.dataset import channel_stats
from convforge.data.paths import printable
from convforge.data.photos import DEFAULT_IMAGE_SIZE, CropViewsMixin
from convforge.data.shards import ShardLoader, ShardSet, open_shards
from convforge.data.views import resize_center_crop_batch
from convforge.errors import DataError

STATS_SAMPLES = 512  # training images the normalisation statistics are measured on


@dataclass(frozen=True)
class ShardSplit:
    """One split of a ``wds:DIR``: its shards, sample count and how its images are decoded."""

    shards: ShardSet
    name: str
    channels: int
    store_size: int
    skip_bad_images: bool = False
    is_shards = True  # what evaluation tests to stream the split through a ShardLoader

    def __len__(self) -> int:
        return self.shards.count(self.name)

    def loader(self, batch_size: int, mean: Sequence[float], std: Sequence[float], *,
               image_size: Sequence[int], crop_pct: float, train: bool = False, **options: Any) -> ShardLoader:
        """A :class:`ShardLoader` of this split (``options``: ShardLoader's, e.g. rank, device, augment)."""
        return ShardLoader(self.shards, self.name, batch_size, mean, std, train=train, image_size=tuple(image_size),
                           store_size=self.store_size, crop_pct=crop_pct, channels=self.channels,
                           skip_bad_images=self.skip_bad_images, **options)


@dataclass
class ShardDataset(CropViewsMixin):
    """A classification data set of WebDataset shards with the attributes of ``PhotoDataset``: ``image_size``
    is the training crop, ``eval_image_size`` the evaluation crop (default: the same)."""

    spec: str
    classes: list[str]
    train: ShardSplit | None
    test: ShardSplit
    val: ShardSplit | None
    image_size: tuple[int, int]
    crop_pct: float
    store_size: int
    channels: int = 3
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    eval_image_size: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    default_augment: str = "rrc-flip"
    notes: list[str] = field(default_factory=list)
    is_store = False  # no random access by index: the task streams it with ShardLoader
    is_shards = True

    def __post_init__(self) -> None:
        self._pair_sizes()
        if not self.mean:  # measured on views at the training size, whatever the evaluation size
            views = self.sample_views(STATS_SAMPLES, seed=0)
            if not len(views):
                raise DataError(f"{self.spec}: no readable image in the {self.first_split.name} shards")
            self.mean, self.std = channel_stats(views)
            if self.train is None:
                self.notes.append("no train split: normalisation statistics were measured on the evaluation split")

    def sample_views(self, count: int, seed: int = 0) -> torch.Tensor:
        """uint8 (N, C, h, w) centre views at the training crop size of a seeded sample of ``count`` training
        images (of the first split without a train split)."""
        split = self.first_split
        images = split.loader(1, [0.0] * self.channels, [1.0] * self.channels, image_size=self.image_size,
                              crop_pct=self.crop_pct).sample(count, seed)
        if not images:
            return torch.zeros(0, self.channels, *self.image_size, dtype=torch.uint8)
        return resize_center_crop_batch(images, self.image_size, self.crop_pct)


def load_shard_folder(root: Path, spec: str, *, image_size: tuple[int, int] | None, store_size: int,
                      crop_pct: float = 0.875, skip_bad_images: bool = False,
                      log: Callable[[str], None] = print, eval_image_size: tuple[int, int] | None = None,
                      interpolation: str = "bilinear") -> ShardDataset:
    """The data set of the shard folder ``root`` (train/val/test as :class:`ShardSplit`; test falls back to
    val, as for image folders); ``image_size`` is the training crop, ``eval_image_size`` the evaluation crop."""
    shards = open_shards(root)
    notes: list[str] = []
    channels = shards.channels
    if channels is None:
        channels = 3
        notes.append(f"{printable(root)}/classes.json does not record the channels: decoding as RGB")
    if image_size is None:
        image_size = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        notes.append(f"shard data: training and evaluating on {DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE} crops; "
                     "set --image-size to choose")
    splits = {name: ShardSplit(shards, name, channels, store_size, skip_bad_images) for name in shards.splits}
    if "test" not in splits and "val" not in splits:
        raise DataError(f"{printable(root)} has no val-*.tar or test-*.tar shards to evaluate on")
    log(f"shards: {', '.join(f'{name} {len(split)}' for name, split in splits.items())} samples in {printable(root)}")
    test = splits.get("test") or splits["val"]
    val = splits.get("val") if "test" in splits else None
    return ShardDataset(spec=spec, classes=[printable(c) for c in shards.classes], train=splits.get("train"),
                        test=test, val=val, image_size=tuple(image_size), crop_pct=crop_pct,  # type: ignore[arg-type]
                        store_size=store_size, channels=channels, notes=notes, interpolation=interpolation,
                        eval_image_size=tuple(eval_image_size) if eval_image_size else None)  # type: ignore[arg-type]
