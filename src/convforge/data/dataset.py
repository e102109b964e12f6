"""In-memory (or memory-mapped) image datasets as uint8 tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Split:
    """One split: ``images`` is uint8 (N, C, H, W); ``labels`` is int64 (N,) class labels, or, for
    segmentation, integer (uint8 or int64) masks (N, H, W) of class indices matching the images."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        n, _, h, w = self.images.shape
        if self.labels.ndim == 3:
            if self.labels.dtype not in (torch.uint8, torch.int64):
                raise ValueError(f"masks must be uint8 or int64 (N, H, W), got {self.labels.dtype}")
            if tuple(self.labels.shape) != (n, h, w):
                raise ValueError(f"{n} images of {h}x{w} but masks of shape {tuple(self.labels.shape)}")
        elif self.labels.shape != (n,):
            raise ValueError(f"{n} images but labels of shape {tuple(self.labels.shape)}")

    @property
    def has_masks(self) -> bool:
        """Whether ``labels`` are per-pixel masks (segmentation) rather than one class per image."""
        return self.labels.ndim == 3

    def __len__(self) -> int:
        return self.images.shape[0]


class SplitsMixin:
    """``num_classes`` and ``split(name)`` of a data set with ``classes``, ``spec`` and split attributes."""

    classes: list[str]
    spec: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Any:
        """The split called ``name`` (``train``, ``val``, ``test``); KeyError when the data set has none."""
        chosen = getattr(self, name, None)
        if chosen is None:
            raise KeyError(f"dataset {self.spec!r} has no {name!r} split")
        return chosen


@dataclass
class Dataset(SplitsMixin):
    """A classification dataset: named classes, splits, and the normalisation measured on ``train``."""

    spec: str
    classes: list[str]
    train: Split | None
    test: Split
    val: Split | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    default_augment: str = "none"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.mean:
            # Measured on train; an evaluation-only folder (no train/) falls back to its own images.
            self.mean, self.std = channel_stats(self.first_split.images)
            if self.train is None:
                self.notes.append("no train split: normalisation statistics were measured on the evaluation split")

    @property
    def first_split(self) -> Split:
        return next(s for s in (self.train, self.val, self.test) if s is not None)

    @property
    def channels(self) -> int:
        return self.first_split.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.first_split.images.shape[2:])  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "classes": list(self.classes),
            "channels": self.channels,
            "image_size": list(self.image_size),
            "train": len(self.train) if self.train is not None else 0,
            "val": len(self.val) if self.val is not None else 0,
            "test": len(self.test),
            "mean": [round(m, 6) for m in self.mean],
            "std": [round(s, 6) for s in self.std],
        }


def channel_stats(images: torch.Tensor, max_images: int = 50_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale (from at most ``max_images``)."""
    sample = images[:max_images]
    total = torch.zeros(sample.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for start in range(0, sample.shape[0], 4096):
        chunk = sample[start:start + 4096].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    if count == 0:
        return tuple([0.5] * sample.shape[1]), tuple([0.5] * sample.shape[1])
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) images to ``channels``: gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")
