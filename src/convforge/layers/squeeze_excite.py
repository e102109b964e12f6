"""Squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks", 2018)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class SqueezeExcite(nn.Module):
    """Channel gating: global average pool, 1x1 reduce, activation, 1x1 expand, gate.

    ``reduced_channels`` is given explicitly because families round it differently
    (SE-ResNet: channels // 16; MobileNetV3: make_divisible(channels // 4, 8); EfficientNet:
    a quarter of the block's *input* channels).
    """

    def __init__(
        self,
        channels: int,
        reduced_channels: int,
        act: Callable[[], nn.Module] = nn.ReLU,
        gate: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced_channels, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(reduced_channels, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(scale))))
