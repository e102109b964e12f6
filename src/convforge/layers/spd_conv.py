"""SPD-Conv (Sunkara & Luo, "No More Strided Convolutions or Pooling", ECML PKDD 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from convforge.layers.conv_norm_act import ConvNormAct


def space_to_depth(x: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """Rearrange ``(N, C, H, W)`` into ``(N, C * scale**2, H / scale, W / scale)`` without losing a pixel.

    The sub-maps are concatenated in the paper's order (``x[::2, ::2], x[1::2, ::2], x[::2, 1::2],
    x[1::2, 1::2]`` for scale 2: row offset fastest); odd sizes are zero-padded at the bottom/right.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % scale, (-width) % scale
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return torch.cat([x[..., i::scale, j::scale] for j in range(scale) for i in range(scale)], dim=1)


class SpaceToDepth(nn.Module):
    """Module form of :func:`space_to_depth`."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_depth(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class SPDConv(nn.Sequential):
    """Space-to-depth by ``scale`` then a non-strided conv-norm-activation: a drop-in for a strided conv.

    Downsamples by ``scale`` like a stride-``scale`` convolution but keeps every input pixel
    (in the channel dimension) instead of discarding three in four.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        scale: int = 2,
        norm: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
        act: Callable[[], nn.Module] | None = nn.ReLU,
    ) -> None:
        super().__init__(
            SpaceToDepth(scale),
            ConvNormAct(in_channels * scale * scale, out_channels, kernel_size, stride=1, norm=norm, act=act),
        )
