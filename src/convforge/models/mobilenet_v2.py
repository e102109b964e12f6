"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

Layout and parameter names follow torchvision (``features.{i}.conv.{j}``, ``classifier.1``).

``mobilenet_v2_cifar``: the same network for 32x32 inputs with the strides of the common CIFAR port
(kuangliu/pytorch-cifar ``models/mobilenetv2.py``): stem convolution and the second stage (c=24) at stride 1,
so the last feature map is 4x4. Unlike that port, stride-1 blocks that change the width get no 1x1 projection
shortcut (the paper's and torchvision's blocks are kept): 2,236,682 parameters with 10 classes (the port: about
2.30 M).
"""

from __future__ import annotations

import torch
from torch import nn

from convforge.layers import ConvNormAct, make_divisible
from convforge.models.base import Classifier, init_conv_bn_linear
from convforge.models.registry import register_model

PAPER = "MobileNetV2: Inverted Residuals and Linear Bottlenecks"

# expansion t, output channels c, repeats n, first stride s (Table 2 of the paper)
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# CIFAR (32x32 inputs): the second stage keeps the resolution (with a stride-1 stem: 32 -> 32 -> 16 -> 8 -> 4)
CIFAR_INVERTED_RESIDUAL_SETTING = tuple((t, c, n, 1 if c == 24 else s) for t, c, n, s in INVERTED_RESIDUAL_SETTING)


class InvertedResidual(nn.Module):
    """1x1 expansion (ReLU6), 3x3 depthwise (ReLU6), linear 1x1 projection; residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_channels, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvNormAct(hidden, hidden, 3, stride=stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(Classifier):
    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        stem_stride: int = 2,
        setting: tuple[tuple[int, int, int, int], ...] = INVERTED_RESIDUAL_SETTING,
    ) -> None:
        super().__init__()
        channels = make_divisible(32 * width_mult, 8)
        last_channels = make_divisible(1280 * max(1.0, width_mult), 8)
        layers: list[nn.Module] = [ConvNormAct(in_chans, channels, 3, stride=stem_stride, act=nn.ReLU6)]
        for t, c, n, s in setting:
            out_channels = make_divisible(c * width_mult, 8)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        layers.append(ConvNormAct(channels, last_channels, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.num_features = last_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

        init_conv_bn_linear(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)


@register_model(
    "mobilenet_v2",
    family="mobilenet_v2",
    paper=PAPER,
    year=2018,
    published_params=3_504_872,
    published_macs=300_000_000,
    published_top1=71.878,
    description="MobileNetV2 1.0-224: inverted residuals with linear bottlenecks",
)
def mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, dropout=dropout)


@register_model(
    "mobilenet_v2_cifar",
    family="mobilenet_v2",
    paper=PAPER,
    year=2018,
    input_size=(3, 32, 32),
    num_classes=10,
    description="MobileNetV2 1.0 for 32x32 inputs (stride-1 stem and second stage, 4x4 last feature map)",
)
def mobilenet_v2_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                       dropout: float = 0.0) -> MobileNetV2:
    """MobileNetV2 with the CIFAR port's strides; no dropout before the classifier, as in that port."""
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, dropout=dropout,
                       stem_stride=1, setting=CIFAR_INVERTED_RESIDUAL_SETTING)
