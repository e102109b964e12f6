"""MobileNetV3 (Howard et al., "Searching for MobileNetV3", ICCV 2019): Large and Small.

Layout and parameter names follow torchvision (``features.{i}.block.{j}``, ``classifier.{0,3}``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from convforge.layers import ConvNormAct, SqueezeExcite, make_divisible
from convforge.models.base import Classifier, init_conv_bn_linear
from convforge.models.registry import register_model

PAPER = "Searching for MobileNetV3"


class BlockConfig(NamedTuple):
    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    hardswish: bool  # "HS" in the paper's tables; ReLU ("RE") otherwise
    stride: int


# Tables 1 and 2 of the paper.
LARGE = [
    BlockConfig(16, 3, 16, 16, False, False, 1),
    BlockConfig(16, 3, 64, 24, False, False, 2),
    BlockConfig(24, 3, 72, 24, False, False, 1),
    BlockConfig(24, 5, 72, 40, True, False, 2),
    BlockConfig(40, 5, 120, 40, True, False, 1),
    BlockConfig(40, 5, 120, 40, True, False, 1),
    BlockConfig(40, 3, 240, 80, False, True, 2),
    BlockConfig(80, 3, 200, 80, False, True, 1),
    BlockConfig(80, 3, 184, 80, False, True, 1),
    BlockConfig(80, 3, 184, 80, False, True, 1),
    BlockConfig(80, 3, 480, 112, True, True, 1),
    BlockConfig(112, 3, 672, 112, True, True, 1),
    BlockConfig(112, 5, 672, 160, True, True, 2),
    BlockConfig(160, 5, 960, 160, True, True, 1),
    BlockConfig(160, 5, 960, 160, True, True, 1),
]
SMALL = [
    BlockConfig(16, 3, 16, 16, True, False, 2),
    BlockConfig(16, 3, 72, 24, False, False, 2),
    BlockConfig(24, 3, 88, 24, False, False, 1),
    BlockConfig(24, 5, 96, 40, True, True, 2),
    BlockConfig(40, 5, 240, 40, True, True, 1),
    BlockConfig(40, 5, 240, 40, True, True, 1),
    BlockConfig(40, 5, 120, 48, True, True, 1),
    BlockConfig(48, 5, 144, 48, True, True, 1),
    BlockConfig(48, 5, 288, 96, True, True, 2),
    BlockConfig(96, 5, 576, 96, True, True, 1),
    BlockConfig(96, 5, 576, 96, True, True, 1),
]


class InvertedResidual(nn.Module):
    """Expansion 1x1, depthwise kxk, optional squeeze-excite (hard-sigmoid gate), linear projection."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        act = nn.Hardswish if cfg.hardswish else nn.ReLU
        self.use_res_connect = cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        layers: list[nn.Module] = []
        if cfg.expanded != cfg.in_channels:
            layers.append(ConvNormAct(cfg.in_channels, cfg.expanded, 1, act=act))
        layers.append(ConvNormAct(cfg.expanded, cfg.expanded, cfg.kernel, stride=cfg.stride, groups=cfg.expanded, act=act))
        if cfg.use_se:
            layers.append(SqueezeExcite(cfg.expanded, make_divisible(cfg.expanded // 4, 8), gate=nn.Hardsigmoid))
        layers.append(ConvNormAct(cfg.expanded, cfg.out_channels, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res_connect else out


class MobileNetV3(Classifier):
    def __init__(
        self,
        settings: list[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        in_chans: int = 3,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        first = settings[0].in_channels
        layers: list[nn.Module] = [ConvNormAct(in_chans, first, 3, stride=2, act=nn.Hardswish)]
        layers += [InvertedResidual(cfg) for cfg in settings]
        last_in = settings[-1].out_channels
        last_conv = 6 * last_in
        layers.append(ConvNormAct(last_in, last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # The head's 1x1 "conv" after pooling is a Linear (as in torchvision); its output is the feature vector.
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(last_channel, num_classes),
        )
        self.num_features = last_channel

        init_conv_bn_linear(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        x = self.classifier[1](self.classifier[0](x))
        if pre_logits:
            return x
        return self.classifier[3](self.classifier[2](x))


@register_model(
    "mobilenet_v3_large",
    family="mobilenet_v3",
    paper=PAPER,
    year=2019,
    published_params=5_483_032,
    published_macs=219_000_000,
    published_top1=74.042,
    description="MobileNetV3-Large 1.0-224",
)
def mobilenet_v3_large(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.2) -> MobileNetV3:
    return MobileNetV3(LARGE, 1280, num_classes=num_classes, in_chans=in_chans, dropout=dropout)


@register_model(
    "mobilenet_v3_small",
    family="mobilenet_v3",
    paper=PAPER,
    year=2019,
    published_params=2_542_856,
    published_macs=56_000_000,
    published_top1=67.668,
    description="MobileNetV3-Small 1.0-224",
)
def mobilenet_v3_small(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.2) -> MobileNetV3:
    return MobileNetV3(SMALL, 1024, num_classes=num_classes, in_chans=in_chans, dropout=dropout)
