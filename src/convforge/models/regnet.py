"""RegNetX and RegNetY (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020).

A RegNet is generated from five numbers: the per-block widths follow the linear rule
``u_j = w_0 + w_a * j`` for ``j < depth``, quantised in log space to powers of ``w_m`` (``w_j =
w_0 * w_m ** round(log(u_j / w_0) / log(w_m))``, rounded to a multiple of 8); consecutive blocks of
equal width form a stage. Every block is an X block (1x1, grouped 3x3 with ``group_width``
channels per group, 1x1, bottleneck ratio 1); RegNetY adds squeeze-excitation with ratio 0.25.
Layout and parameter names follow torchvision (``stem``, ``trunk_output.block{i}.block{i}-{j}.f.{a,b,se,c}``, ``fc``).

The stage widths are made multiples of the group width with torchvision's rounding (half up,
never more than 10% down), so the parameter counts are torchvision's. The paper's own code (pycls)
rounds halves to even, which differs for two of the models here: RegNetX-400MF's last stage is 384
wide there (5.2M parameters, the paper's figure) and 400 here and in torchvision (5.5M); RegNetY-800MF's
stages are 64/128/320/768 there (6.3M) and 64/144/320/784 here (6.4M).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn

from convforge.layers import ConvNormAct, SqueezeExcite, make_divisible
from convforge.models.base import Classifier
from convforge.models.registry import register_model

PAPER = "Designing Network Design Spaces"
STEM_WIDTH = 32
QUANT = 8


class StageSpec(NamedTuple):
    width: int
    depth: int
    group_width: int


def generate_stages(
    depth: int, w_0: float, w_a: float, w_m: float, group_width: int, bottleneck_ratio: float = 1.0
) -> list[StageSpec]:
    """The stages (width, number of blocks, group width) of the RegNet with these design-space parameters."""
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % QUANT != 0:
        raise ValueError(f"invalid RegNet parameters w_0={w_0}, w_a={w_a}, w_m={w_m}")
    # linear widths, quantised to the nearest power of w_m times w_0, then to a multiple of QUANT
    continuous = [w_0 + w_a * j for j in range(depth)]
    exponents = [round(math.log(u / w_0) / math.log(w_m)) for u in continuous]
    widths = [int(round(w_0 * w_m**e / QUANT) * QUANT) for e in exponents]
    # consecutive blocks of equal width form one stage
    stages: list[list[int]] = []
    for width in widths:
        if stages and stages[-1][0] == width:
            stages[-1][1] += 1
        else:
            stages.append([width, 1])
    # make the bottleneck width a multiple of the group width (groups never wider than the bottleneck)
    specs = []
    for width, blocks in stages:
        bottleneck = int(width * bottleneck_ratio)
        group = min(group_width, bottleneck)
        bottleneck = make_divisible(bottleneck, group)
        specs.append(StageSpec(int(bottleneck / bottleneck_ratio), blocks, group))
    return specs


class BottleneckTransform(nn.Sequential):
    """1x1 conv, grouped 3x3 conv (stride here), optional squeeze-excite, 1x1 conv without activation."""

    def __init__(
        self, width_in: int, width_out: int, stride: int, group_width: int, bottleneck_ratio: float,
        se_ratio: float | None,
    ) -> None:
        w_b = round(width_out * bottleneck_ratio)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["a"] = ConvNormAct(width_in, w_b, 1)
        layers["b"] = ConvNormAct(w_b, w_b, 3, stride=stride, groups=w_b // group_width)
        if se_ratio:
            # the squeeze width is a share of the block's input width, as in the paper's code
            layers["se"] = SqueezeExcite(w_b, round(se_ratio * width_in))
        layers["c"] = ConvNormAct(w_b, width_out, 1, act=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """X block (Y block with squeeze-excite): ``relu(proj(x) + f(x))``, projecting when the shape changes."""

    def __init__(
        self, width_in: int, width_out: int, stride: int, group_width: int, bottleneck_ratio: float = 1.0,
        se_ratio: float | None = None,
    ) -> None:
        super().__init__()
        self.proj = (
            ConvNormAct(width_in, width_out, 1, stride=stride, act=None)
            if width_in != width_out or stride != 1
            else None
        )
        self.f = BottleneckTransform(width_in, width_out, stride, group_width, bottleneck_ratio, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(x) if self.proj is not None else x
        return self.activation(shortcut + self.f(x))


class AnyStage(nn.Sequential):
    """``depth`` blocks of one width; the first one downsamples by 2."""

    def __init__(self, width_in: int, spec: StageSpec, stage_index: int, se_ratio: float | None) -> None:
        super().__init__()
        for i in range(spec.depth):
            block = ResBottleneckBlock(
                width_in if i == 0 else spec.width, spec.width, 2 if i == 0 else 1, spec.group_width,
                se_ratio=se_ratio,
            )
            self.add_module(f"block{stage_index}-{i}", block)


class RegNet(Classifier):
    def __init__(
        self,
        depth: int,
        w_0: float,
        w_a: float,
        w_m: float,
        group_width: int,
        se_ratio: float | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.stage_specs = generate_stages(depth, w_0, w_a, w_m, group_width)
        self.stem = ConvNormAct(in_chans, STEM_WIDTH, 3, stride=2)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        width = STEM_WIDTH
        for i, spec in enumerate(self.stage_specs, start=1):
            stages[f"block{i}"] = AnyStage(width, spec, i, se_ratio)
            width = spec.width
        self.trunk_output = nn.Sequential(stages)
        self.num_features = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_output(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


class Spec(NamedTuple):
    depth: int
    w_0: int
    w_a: float
    w_m: float
    group_width: int
    params: int  # torchvision's documented count
    gmacs: float  # torchvision's documented "GFLOPS" (multiply-adds) at 224
    top1: float  # torchvision's ImageNet top-1 (IMAGENET1K_V1 weights)


# Design-space parameters of the paper's models (pycls configs, Appendix of the paper).
REGNETX = {
    "400mf": Spec(22, 24, 24.48, 2.54, 16, 5_495_976, 0.41, 72.834),
    "800mf": Spec(16, 56, 35.73, 2.28, 16, 7_259_656, 0.80, 75.212),
    "1_6gf": Spec(18, 80, 34.01, 2.25, 24, 9_190_136, 1.60, 77.040),
    "3_2gf": Spec(25, 88, 26.31, 2.25, 48, 15_296_552, 3.18, 78.364),
}
REGNETY = {
    "400mf": Spec(16, 48, 27.89, 2.09, 8, 4_344_144, 0.40, 74.046),
    "800mf": Spec(14, 56, 38.84, 2.40, 16, 6_432_512, 0.83, 76.420),
    "1_6gf": Spec(27, 48, 20.71, 2.65, 24, 11_202_430, 1.61, 77.950),
    "3_2gf": Spec(21, 80, 42.63, 2.66, 24, 19_436_338, 3.18, 78.948),
}


def _register(kind: str, size: str, spec: Spec) -> None:
    se_ratio = 0.25 if kind == "y" else None

    @register_model(
        f"regnet{kind}_{size}",
        family=f"regnet{kind}",
        paper=PAPER,
        year=2020,
        published_params=spec.params,
        published_macs=round(spec.gmacs * 1e9),
        published_top1=spec.top1,
        description=f"RegNet{kind.upper()}-{size.upper().replace('_', '.')} (d={spec.depth}, w0={spec.w_0}, "
        f"wa={spec.w_a}, wm={spec.w_m}, g={spec.group_width})",
    )
    def build(num_classes: int = 1000, in_chans: int = 3) -> RegNet:
        return RegNet(spec.depth, spec.w_0, spec.w_a, spec.w_m, spec.group_width, se_ratio=se_ratio,
                      num_classes=num_classes, in_chans=in_chans)


for _size, _spec in REGNETX.items():
    _register("x", _size, _spec)
for _size, _spec in REGNETY.items():
    _register("y", _size, _spec)
