"""Convolution, normalisation and activation in one block."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn


class ConvNormAct(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> activation`` with "same" padding for odd kernels and no conv bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        norm: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
        act: Callable[[], nn.Module] | None = nn.ReLU,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=norm is None,
            )
        ]
        if norm is not None:
            layers.append(norm(out_channels))
        if act is not None:
            layers.append(act())
        super().__init__(*layers)
