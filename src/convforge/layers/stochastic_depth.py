"""Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", 2016), per sample."""

from __future__ import annotations

import torch
import torch.nn as nn


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Zero whole residual branches for a random ``rate`` share of the samples, rescaling the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; identity in eval mode or when ``rate`` is 0."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def linear_drop_path_rates(max_rate: float, num_blocks: int) -> list[float]:
    """The linear-in-depth rule: block i of n gets ``max_rate * i / (n - 1)`` (0 for the first)."""
    if num_blocks <= 1:
        return [0.0] * num_blocks
    return [max_rate * i / (num_blocks - 1) for i in range(num_blocks)]
