"""Batch-level regularisers: mixup (Zhang et al. 2018), CutMix (Yun et al. 2019), random erasing
(Zhong et al. 2020). Every draw comes from a generator seeded by (seed, epoch, batch, rank), so a
resumed run repeats them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def batch_rng(seed: int, epoch: int, batch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, batch, rank, 0x5EED])


@dataclass
class MixedTargets:
    """Labels of a mixed batch: the loss is ``lam * CE(y_a) + (1 - lam) * CE(y_b)``."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float

    def loss(self, logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        if self.lam == 1.0:
            return F.cross_entropy(logits, self.y_a, label_smoothing=label_smoothing)
        return (self.lam * F.cross_entropy(logits, self.y_a, label_smoothing=label_smoothing)
                + (1 - self.lam) * F.cross_entropy(logits, self.y_b, label_smoothing=label_smoothing))


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, mixup_alpha: float, cutmix_alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, MixedTargets]:
    """Mixup or CutMix (one of the two, with equal chance, when both are on) with a shuffled copy of the batch."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0 or x.shape[0] < 2:
        return x, MixedTargets(y, y, 1.0)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    if not use_cutmix:
        return torch.lerp(x[perm], x, lam), MixedTargets(y, y[perm], lam)
    h, w = x.shape[2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)  # the share of the image that stayed
    return mixed, MixedTargets(y, y[perm], lam)


def random_erase(
    x: torch.Tensor, probability: float, rng: np.random.Generator,
    area: tuple[float, float] = (0.02, 1 / 3), aspect: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Set one random rectangle per chosen image (each with ``probability``) to 0, the mean after normalisation."""
    if probability <= 0:
        return x
    n, _, h, w = x.shape
    chosen = rng.random(n) < probability
    if not chosen.any():
        return x
    areas = rng.uniform(*area, n) * h * w
    ratios = np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]), n))
    eh = np.clip(np.sqrt(areas * ratios).astype(int), 1, h)
    ew = np.clip(np.sqrt(areas / ratios).astype(int), 1, w)
    top = (rng.random(n) * (h - eh + 1)).astype(int)
    left = (rng.random(n) * (w - ew + 1)).astype(int)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)

    def col(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(x.device).view(n, 1, 1)

    inside = ((rows >= col(top)) & (rows < col(top + eh)) & (cols >= col(left)) & (cols < col(left + ew))
              & torch.from_numpy(chosen).to(x.device).view(n, 1, 1))
    return x.masked_fill(inside.unsqueeze(1), 0.0)
