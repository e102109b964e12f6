"""The evaluated points: a seeded subset of one split, in the model's class order and channel count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from convforge.errors import ConfigError, DataError


@dataclass
class PointSet:
    """Split indices (sorted), their labels and a way to fetch their uint8 evaluation views by position."""

    data: Any
    split: str
    indices: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor | None  # fixed-size data: the selected images; image stores: None (decoded per chunk)
    split_size: int

    def __len__(self) -> int:
        return len(self.indices)

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of positions ``start:stop``."""
        if self.images is not None:
            return self.images[start:stop], self.labels[start:stop]
        from convforge.train.inference import view_images

        return view_images(self.data, self.split, self.indices[start:stop]), self.labels[start:stop]


def select_points(loaded: Any, data: Any, split: str, samples: int | None, seed: int, notes: list[str]) -> PointSet:
    """``samples`` images of ``split`` drawn without replacement by ``seed`` (all of them when None), sorted."""
    if getattr(data, "is_shards", False):
        raise ConfigError("robust evaluation picks images by index, which WebDataset shards do not allow: "
                          "evaluate an imagefolder:DIR (or a fixed-size data spec) instead")
    if split not in ("train", "val", "test") or getattr(data, split, None) is None:
        raise ConfigError(f"dataset {data.spec!r} has no {split!r} split")
    if getattr(data, "is_store", False):
        if list(data.classes) != list(loaded.classes) or data.channels != loaded.input_size[0]:
            raise DataError(f"the data's classes or channels are not the model's ({', '.join(loaded.classes[:12])}; "
                            f"{loaded.input_size[0]} channels): evaluate on data with the same class folders")
        all_labels, all_images = data.split(split).labels, None
    else:
        from convforge.train.inference import aligned_split

        part = aligned_split(loaded, data, split, notes)
        all_labels, all_images = part.labels, part.images
    size = len(all_labels)
    if samples is not None and not 1 <= samples <= size:
        raise ConfigError(f"--samples {samples}: the {split} split of {data.spec} has {size} images; "
                          f"give 1..{size} (or leave --samples out for all of them)")
    if samples is None or samples == size:
        indices = torch.arange(size)
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(size, generator=generator)[:samples].sort().values
    images = all_images[indices] if all_images is not None else None
    return PointSet(data, split, indices, all_labels[indices], images, size)
