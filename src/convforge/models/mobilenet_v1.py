"""MobileNetV1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", 2017): a 3x3 stem and thirteen depthwise-separable blocks (Table 1 of the paper)."""

from __future__ import annotations

import torch
from torch import nn

from convforge.layers import ConvNormAct, make_divisible
from convforge.models.base import Classifier, init_conv_bn_linear
from convforge.models.registry import register_model

PAPER = "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications"

# (output channels, stride) of the depthwise-separable blocks, Table 1. The paper's table marks the
# last-but-one block "s2", but its output stays 7x7 (and every implementation uses stride 1 there).
BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class DepthwiseSeparableConv(nn.Sequential):
    """3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU (Figure 3 of the paper)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.dw = ConvNormAct(in_channels, in_channels, 3, stride=stride, groups=in_channels)
        self.pw = ConvNormAct(in_channels, out_channels, 1)


class MobileNetV1(Classifier):
    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        channels = make_divisible(32 * width_mult, 8)
        layers: list[nn.Module] = [ConvNormAct(in_chans, channels, 3, stride=2)]
        for out_channels, stride in BLOCKS:
            out_channels = make_divisible(out_channels * width_mult, 8)
            layers.append(DepthwiseSeparableConv(channels, out_channels, stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))

        init_conv_bn_linear(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)


# The paper gives "4.2 million" parameters and 569 million mult-adds (Table 8); 4,231,976 is the exact
# count of this layout (convs without bias, BatchNorm scale and shift, a 1024x1000 classifier with bias).
@register_model(
    "mobilenet_v1",
    family="mobilenet_v1",
    paper=PAPER,
    year=2017,
    published_params=4_231_976,
    published_macs=569_000_000,
    published_top1=70.6,
    description="MobileNetV1 1.0-224: depthwise-separable convolutions",
)
def mobilenet_v1(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.0) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, dropout=dropout)
