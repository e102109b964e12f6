"""EfficientNet-B0 to B7 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019): one baseline (B0, Table 1) scaled by the compound rule.

Each variant is a width multiplier, a depth multiplier, an input resolution and a dropout rate;
channels are rounded with ``round_filters`` and block repeats with ``round_repeats``. Layout and
parameter names follow torchvision (``features.{i}.{j}.block.{k}``, ``classifier.1``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from convforge.layers import ConvNormAct, DropPath, SqueezeExcite, make_divisible
from convforge.models.base import Classifier
from convforge.models.registry import register_model

PAPER = "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"


class StageConfig(NamedTuple):
    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int


# EfficientNet-B0 (Table 1 of the paper): MBConv stages after the 32-channel stem.
B0_STAGES = (
    StageConfig(1, 3, 1, 32, 16, 1),
    StageConfig(6, 3, 2, 16, 24, 2),
    StageConfig(6, 5, 2, 24, 40, 2),
    StageConfig(6, 3, 2, 40, 80, 3),
    StageConfig(6, 5, 1, 80, 112, 3),
    StageConfig(6, 5, 2, 112, 192, 4),
    StageConfig(6, 3, 1, 192, 320, 1),
)


class Variant(NamedTuple):
    width_mult: float
    depth_mult: float
    resolution: int
    dropout: float
    params: int  # torchvision's documented count
    gmacs: float  # torchvision's documented "GFLOPS" (multiply-adds) at that resolution
    top1: float  # torchvision's ImageNet top-1 of the ported reference weights


# The compound-scaling coefficients of the reference implementation (efficientnet_builder.py), with
# the resolutions at which torchvision evaluates (B2 at 288 rather than the paper's 260).
VARIANTS = {
    "b0": Variant(1.0, 1.0, 224, 0.2, 5_288_548, 0.39, 77.692),
    "b1": Variant(1.0, 1.1, 240, 0.2, 7_794_184, 0.69, 78.642),
    "b2": Variant(1.1, 1.2, 288, 0.3, 9_109_994, 1.09, 80.608),
    "b3": Variant(1.2, 1.4, 300, 0.3, 12_233_232, 1.83, 82.008),
    "b4": Variant(1.4, 1.8, 380, 0.4, 19_341_616, 4.39, 83.384),
    "b5": Variant(1.6, 2.2, 456, 0.4, 30_389_784, 10.27, 83.444),
    "b6": Variant(1.8, 2.6, 528, 0.5, 43_040_704, 19.07, 84.008),
    "b7": Variant(2.0, 3.1, 600, 0.5, 66_347_960, 37.75, 84.122),
}


def round_filters(channels: int, width_mult: float) -> int:
    """Scale a channel count by the width multiplier, rounded to a multiple of 8."""
    return make_divisible(channels * width_mult, 8)


def round_repeats(repeats: int, depth_mult: float) -> int:
    """Scale a stage's block count by the depth multiplier, rounded up."""
    return math.ceil(repeats * depth_mult)


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion, depthwise kxk, squeeze-excite, linear 1x1 projection (SiLU).

    The squeeze-excite bottleneck is a quarter of the block's *input* channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        drop_path_rate: float,
        norm: type[nn.Module] | partial = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_channels == out_channels
        expanded = make_divisible(in_channels * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvNormAct(in_channels, expanded, 1, norm=norm, act=nn.SiLU))
        layers += [
            ConvNormAct(expanded, expanded, kernel, stride=stride, groups=expanded, norm=norm, act=nn.SiLU),
            SqueezeExcite(expanded, max(1, in_channels // 4), act=nn.SiLU),
            ConvNormAct(expanded, out_channels, 1, norm=norm, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(Classifier):
    def __init__(
        self,
        width_mult: float,
        depth_mult: float,
        num_classes: int = 1000,
        in_chans: int = 3,
        dropout: float = 0.2,
        drop_path_rate: float = 0.2,
        norm: type[nn.Module] | partial = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        stages = [
            cfg._replace(
                in_channels=round_filters(cfg.in_channels, width_mult),
                out_channels=round_filters(cfg.out_channels, width_mult),
                repeats=round_repeats(cfg.repeats, depth_mult),
            )
            for cfg in B0_STAGES
        ]
        total_blocks = sum(cfg.repeats for cfg in stages)
        layers: list[nn.Module] = [
            ConvNormAct(in_chans, stages[0].in_channels, 3, stride=2, norm=norm, act=nn.SiLU)
        ]
        block_id = 0
        for cfg in stages:
            blocks = []
            for i in range(cfg.repeats):
                # stochastic depth grows linearly with the block index (0 for the first block)
                rate = drop_path_rate * block_id / total_blocks
                blocks.append(MBConv(
                    cfg.in_channels if i == 0 else cfg.out_channels,
                    cfg.out_channels,
                    cfg.kernel,
                    cfg.stride if i == 0 else 1,
                    cfg.expand_ratio,
                    rate,
                    norm,
                ))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        last_in = stages[-1].out_channels
        self.num_features = 4 * last_in
        layers.append(ConvNormAct(last_in, self.num_features, 1, norm=norm, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)


def _register(variant: str, spec: Variant) -> None:
    # B5-B7 use the reference implementation's BatchNorm settings (eps 1e-3, momentum 0.01), as torchvision does.
    norm = nn.BatchNorm2d if int(variant[1:]) < 5 else partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)

    @register_model(
        f"efficientnet_{variant}",
        family="efficientnet",
        paper=PAPER,
        year=2019,
        input_size=(3, spec.resolution, spec.resolution),
        published_params=spec.params,
        published_macs=round(spec.gmacs * 1e9),
        published_top1=spec.top1,
        description=f"EfficientNet-{variant.upper()} (width x{spec.width_mult}, depth x{spec.depth_mult}, "
        f"{spec.resolution}px)",
    )
    def build(
        num_classes: int = 1000, in_chans: int = 3, dropout: float = spec.dropout, drop_path_rate: float = 0.2
    ) -> EfficientNet:
        return EfficientNet(
            spec.width_mult, spec.depth_mult, num_classes=num_classes, in_chans=in_chans,
            dropout=dropout, drop_path_rate=drop_path_rate, norm=norm,
        )


for _variant, _spec in VARIANTS.items():
    _register(_variant, _spec)
