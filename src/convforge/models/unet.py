"""U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015).

The paper's architecture with two common changes: "same"-padded 3x3 convolutions (the paper's are
unpadded, so its output is smaller than its input and tiles are mirrored-padded), and BatchNorm
after every convolution (the paper has none). Contracting path: four stages of two 3x3 convolutions
(+ BN + ReLU) and a 2x2 max-pool, widths ``base_width`` x (1, 2, 4, 8), then a bottom stage of
16 x ``base_width``; expanding path: 2x2 up-convolution (stride 2) halving the channels,
concatenation with the contracting stage of the same resolution, two 3x3 convolutions; a final 1x1
convolution to the classes. With ``base_width=64`` (the paper's) this is 31,037,698 parameters for 2
classes (the paper states no count; 31.0 M is the usual figure for this padded, BatchNorm variant).
Each up-convolution is sized to its skip map (max-pooling floors odd sizes), so any input of at
least 16x16 works.
"""

from __future__ import annotations

import torch
from torch import nn

from convforge.errors import ConfigError
from convforge.models._segment import SegmentationModel, conv_bn_relu, resize_to
from convforge.models.registry import register_model

PAPER = "U-Net: Convolutional Networks for Biomedical Image Segmentation"


def double_conv(in_chans: int, out_chans: int) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU."""
    return nn.Sequential(conv_bn_relu(in_chans, out_chans, 3, padding=1), conv_bn_relu(out_chans, out_chans, 3, padding=1))


class UpBlock(nn.Module):
    """2x2 up-convolution halving the channels, concatenation with the skip map, double convolution."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_chans, in_chans // 2, 2, stride=2)
        self.conv = double_conv(in_chans // 2 + out_chans, out_chans)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x, output_size=list(skip.shape[-2:]))
        return self.conv(torch.cat([skip, x], 1))


class UNet(SegmentationModel):
    """U-Net with padded convolutions and BatchNorm (see the module docstring)."""

    def __init__(self, num_classes: int = 2, in_chans: int = 3, base_width: int = 64, depth: int = 4) -> None:
        super().__init__()
        if base_width < 1 or depth < 1:
            raise ConfigError(f"U-Net needs base_width >= 1 and depth >= 1, got {base_width} and {depth}")
        self.num_classes = num_classes
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(in_chans, widths[0])])
        self.down.extend(double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(UpBlock(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(self.pool(x) if i else x)
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return resize_to(self.head(x), size)


@register_model(
    family="unet",
    paper=PAPER,
    year=2015,
    input_size=(3, 180, 240),
    num_classes=2,
    description="U-Net (padded 3x3 convolutions + BatchNorm; base_width 64 as the paper)",
)
def unet(num_classes: int = 2, in_chans: int = 3, base_width: int = 64) -> UNet:
    """U-Net."""
    return UNet(num_classes, in_chans, base_width)
