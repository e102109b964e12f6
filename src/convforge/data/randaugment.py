"""RandAugment on uint8 batches (Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a
reduced search space"), with torchvision's ``RandAugment`` op set and magnitude ranges.

Each image gets ``num_ops`` ops drawn uniformly (with replacement) from the 14 ops, all at the one magnitude
level ``magnitude`` of 31 bins, each signed op negated on a fair coin. Unlike torchvision, which draws one set
of ops per call (a whole batch alike), the draws here are per image. The ops themselves are
``convforge.data.views.apply_op``'s (nearest sampling, fill 0), shared with TrivialAugmentWide.
"""

from __future__ import annotations

from typing import Sequence

import torch

from convforge.data.views import TRIVIAL_AUGMENT_OPS, apply_trivial_augment
from convforge.errors import ConfigError

RANDAUGMENT_BINS = 31  # torchvision's num_magnitude_bins
RANDAUGMENT_NUM_OPS = 2  # torchvision's default num_ops
RANDAUGMENT_MAGNITUDE = 9  # torchvision's default magnitude
# torchvision RandAugment's op set, in its order (the same 14 ops as TrivialAugmentWide's).
RANDAUGMENT_OPS = TRIVIAL_AUGMENT_OPS
_SIGNED_OPS = frozenset(RANDAUGMENT_OPS[1:10])
MAX_NUM_OPS = 16


def check_randaugment(num_ops: int, magnitude: int) -> None:
    """A ConfigError unless ``num_ops`` is in 1..16 and ``magnitude`` a level in 0..30."""
    if isinstance(num_ops, bool) or not isinstance(num_ops, int) or not 1 <= num_ops <= MAX_NUM_OPS:
        raise ConfigError(f"randaugment N (ops per image) must be a whole number in 1..{MAX_NUM_OPS}, got "
                          f"{num_ops!r}: e.g. --randaugment 2 9 (torchvision's default)")
    if isinstance(magnitude, bool) or not isinstance(magnitude, int) or not 0 <= magnitude < RANDAUGMENT_BINS:
        raise ConfigError(f"randaugment M (magnitude level) must be a whole number in 0..{RANDAUGMENT_BINS - 1}, "
                          f"got {magnitude!r}: e.g. --randaugment 2 9 (torchvision's default)")


def randaugment_magnitudes(op: str, image_size: Sequence[int], bins: int = RANDAUGMENT_BINS) -> torch.Tensor:
    """The magnitude of each of the ``bins`` levels of ``op`` (torchvision ``RandAugment._augmentation_space``
    for an (h, w) image): shear 0-0.3, translate 0-150/331 of the width (x) or height (y) in pixels, rotate
    0-30 degrees, brightness/color/contrast/sharpness 0-0.9 (factor 1 +/- m), posterize 8 down to 4 bits,
    solarize threshold 255 down to 0; identity, autocontrast and equalize have none."""
    height, width = int(image_size[0]), int(image_size[1])
    if op in ("shear_x", "shear_y"):
        return torch.linspace(0.0, 0.3, bins)
    if op == "translate_x":
        return torch.linspace(0.0, 150.0 / 331.0 * width, bins)
    if op == "translate_y":
        return torch.linspace(0.0, 150.0 / 331.0 * height, bins)
    if op == "rotate":
        return torch.linspace(0.0, 30.0, bins)
    if op in ("brightness", "color", "contrast", "sharpness"):
        return torch.linspace(0.0, 0.9, bins)
    if op == "posterize":
        return (8 - (torch.arange(bins) / ((bins - 1) / 4)).round()).float()
    if op == "solarize":
        return torch.linspace(255.0, 0.0, bins)
    if op in RANDAUGMENT_OPS:
        return torch.zeros(bins)
    raise ConfigError(f"unknown RandAugment op {op!r}: use one of {', '.join(RANDAUGMENT_OPS)}")


def randaugment_params(n: int, num_ops: int, magnitude: int, image_size: Sequence[int],
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and round: op indices (n, num_ops) into ``RANDAUGMENT_OPS`` and signed magnitudes
    (n, num_ops) at level ``magnitude`` for images of ``image_size`` (h, w)."""
    check_randaugment(num_ops, magnitude)
    ops = torch.randint(len(RANDAUGMENT_OPS), (n, num_ops), generator=generator)
    negative = torch.rand(n, num_ops, generator=generator) < 0.5
    table = torch.stack([randaugment_magnitudes(op, image_size)[magnitude] for op in RANDAUGMENT_OPS])
    magnitudes = table[ops]
    signed = torch.tensor([op in _SIGNED_OPS for op in RANDAUGMENT_OPS])[ops]
    return ops, torch.where(signed & negative, -magnitudes, magnitudes)


def apply_randaugment(batch: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Apply the rounds of ops ``ops[i, k]`` with ``magnitudes[i, k]`` in turn to image i of the uint8
    ``batch`` (N, C, H, W)."""
    out = batch
    for k in range(ops.shape[1]):
        out = apply_trivial_augment(out, ops[:, k], magnitudes[:, k])
    return out if ops.shape[1] else batch.clone()


def randaugment(batch: torch.Tensor, num_ops: int = RANDAUGMENT_NUM_OPS, magnitude: int = RANDAUGMENT_MAGNITUDE,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """RandAugment of a uint8 batch (N, C, H, W): ``num_ops`` ops per image at level ``magnitude``."""
    ops, magnitudes = randaugment_params(batch.shape[0], num_ops, magnitude, batch.shape[-2:], generator)
    return apply_randaugment(batch, ops, magnitudes)
