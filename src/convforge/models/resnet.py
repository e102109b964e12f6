"""ImageNet ResNets and their close relatives, in torchvision's layout.

- ResNet-18/34/50/101/152 (He et al., "Deep Residual Learning for Image Recognition", 2016), with
  the stride on the 3x3 convolution of the bottleneck ("ResNet v1.5", as torchvision and timm).
- The ResNet-D tweaks of "Bag of Tricks for Image Classification" (He et al., 2019) as options:
  ``deep_stem`` (three 3x3 convolutions, 32-32-64 channels, instead of the 7x7) and ``avg_down``
  (2x2 average pooling before a stride-1 projection in the downsampling shortcut).
- Wide ResNet-50-2/101-2 (Zagoruyko & Komodakis, 2016) and ResNeXt-50 32x4d / 101 32x8d
  (Xie et al., 2017): the same bottleneck with a wider or grouped 3x3 convolution.
- SE-ResNet-50 (Hu et al., "Squeeze-and-Excitation Networks", 2018): SE after ``bn3``, reduction 16.
- Res2Net-50 26w4s (Gao et al., "Res2Net: A New Multi-scale Backbone Architecture", 2019).

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1,2,3}``,
``downsample.{0,1}``, ``fc``), timm's for the ResNet-D stem (``conv1.{0..6}``), the SE module
(``se.fc1``, ``se.fc2``) and the average-pool shortcut (``downsample.{1,2}``), and the official
Res2Net implementation's for its block (``convs.{i}``, ``bns.{i}``), so state dicts can be exchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convforge.layers import DropPath, SqueezeExcite, linear_drop_path_rates
from convforge.models.base import Classifier
from convforge.models.registry import register_model

RESNET_PAPER = "Deep Residual Learning for Image Recognition"


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        drop_path_rate: float = 0.0,
        use_se: bool = False,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes, planes // 16) if use_se else None
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(self.drop_path(out) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, optionally grouped), 1x1 expand by 4; optional squeeze-and-excitation."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        drop_path_rate: float = 0.0,
        use_se: bool = False,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        outplanes = planes * self.expansion
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.se = SqueezeExcite(outplanes, outplanes // 16) if use_se else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(self.drop_path(out) + identity)


class Bottle2neck(nn.Module):
    """The Res2Net block: the 3x3 stage is split into ``scale`` groups of ``width`` channels with
    hierarchical residual connections between them.

    In the first block of a stage (the one with a downsampling shortcut) every split is convolved on
    its own and the last split is average-pooled; in the other blocks split ``i`` adds the output of
    split ``i - 1`` before its convolution and the last split passes through unchanged.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 26,
        drop_path_rate: float = 0.0,
        scale: int = 4,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError("Bottle2neck supports only groups=1")
        if scale < 2:
            raise ValueError(f"Res2Net scale must be >= 2, got {scale}")
        width = math.floor(planes * (base_width / 64.0))
        outplanes = planes * self.expansion
        self.width = width
        self.scale = scale
        self.is_first = downsample is not None
        self.conv1 = conv1x1(inplanes, width * scale)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(conv3x3(width, width, stride, dilation=dilation) for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1) if self.is_first else None
        self.conv3 = conv1x1(width * scale, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        splits = torch.split(out, self.width, 1)
        outs = []
        sp = splits[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = splits[i] if i == 0 or self.is_first else sp + splits[i]
            sp = self.relu(bn(conv(sp)))
            outs.append(sp)
        last = splits[self.scale - 1]
        outs.append(self.pool(last) if self.pool is not None else last)
        out = self.bn3(self.conv3(torch.cat(outs, 1)))
        return self.relu(self.drop_path(out) + identity)


class ResNet(Classifier):
    """ResNet trunk: stem (7x7 or deep 3x3 stem, max-pool), four stages, global average pool, ``fc``.

    ``groups``/``width_per_group`` give ResNeXt and Wide ResNet; ``deep_stem``/``avg_down`` give
    ResNet-D; ``block_args`` are passed to every block (``use_se`` for SE-ResNet, ``scale`` for
    Res2Net); ``drop_path_rate`` is the stochastic-depth rate of the last block (linear in depth).

    ``replace_stride_with_dilation`` (three flags, for ``layer2``..``layer4``, as torchvision) makes a
    stage keep its input resolution and dilate its 3x3 convolutions instead (the first block of the
    stage keeps the previous dilation): ``(False, False, True)`` gives output stride 16,
    ``(False, True, True)`` output stride 8, for dense prediction. Parameters are unchanged.
    ``zero_init_residual`` (as torchvision) zeroes the last BatchNorm scale of every residual branch.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_chans: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        deep_stem: bool = False,
        avg_down: bool = False,
        drop_path_rate: float = 0.0,
        block_args: dict[str, Any] | None = None,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        dilate = tuple(bool(flag) for flag in (replace_stride_with_dilation or (False, False, False)))
        if len(dilate) != 3:
            raise ValueError(f"replace_stride_with_dilation needs 3 flags (layer2..layer4), got {len(dilate)}")
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.avg_down = avg_down
        self.block_args = dict(block_args or {})
        self.inplanes = 64
        if deep_stem:
            stem_width = 32
            self.conv1: nn.Module = nn.Sequential(
                conv3x3(in_chans, stem_width, stride=2),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                conv3x3(stem_width, stem_width),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                conv3x3(stem_width, self.inplanes),
            )
        else:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        rates = iter(linear_drop_path_rates(drop_path_rate, sum(layers)))
        self.layer1 = self._make_layer(block, 64, layers[0], 1, rates)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, rates, dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, rates, dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, rates, dilate[2])
        self.num_features = 512 * block.expansion  # type: ignore[attr-defined]
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # Goyal et al. 2017: each block starts as the identity (helps short schedules)
            for m in self.modules():
                last_bn = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)) and last_bn is not None:
                    nn.init.zeros_(last_bn.weight)

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int, rates, dilate: bool = False
    ) -> nn.Sequential:
        outplanes = planes * block.expansion  # type: ignore[attr-defined]
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != outplanes:
            if self.avg_down:
                pool: nn.Module = (
                    nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
                )
                downsample = nn.Sequential(pool, conv1x1(self.inplanes, outplanes), nn.BatchNorm2d(outplanes))
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))
        layers = []
        for i in range(blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    stride if i == 0 else 1,
                    downsample if i == 0 else None,
                    groups=self.groups,
                    base_width=self.base_width,
                    drop_path_rate=next(rates),
                    dilation=previous_dilation if i == 0 else self.dilation,
                    **self.block_args,
                )
            )
            self.inplanes = outplanes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


# --- ResNet-18 .. 152 (torchvision's counts, GFLOPS (= GMACs) and IMAGENET1K_V1 top-1) -------------

_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def _register_resnet(depth: int, params: int, gmacs: float, top1: float) -> None:
    block, layers = _DEPTHS[depth]

    @register_model(
        f"resnet{depth}",
        family="resnet",
        paper=RESNET_PAPER,
        year=2016,
        published_params=params,
        published_macs=round(gmacs * 1e9),
        published_top1=top1,
        description=f"ResNet-{depth} (torchvision layout; deep_stem/avg_down give ResNet-D)",
    )
    def build(
        num_classes: int = 1000,
        in_chans: int = 3,
        deep_stem: bool = False,
        avg_down: bool = False,
        drop_path_rate: float = 0.0,
        zero_init_residual: bool = False,
    ) -> ResNet:
        return ResNet(block, layers, num_classes, in_chans, deep_stem=deep_stem, avg_down=avg_down,
                      drop_path_rate=drop_path_rate, zero_init_residual=zero_init_residual)


for _depth, _params, _gmacs, _top1 in (
    (18, 11_689_512, 1.81, 69.758),
    (34, 21_797_672, 3.66, 73.314),
    (50, 25_557_032, 4.09, 76.130),
    (101, 44_549_160, 7.80, 77.374),
    (152, 60_192_808, 11.51, 78.312),
):
    _register_resnet(_depth, _params, _gmacs, _top1)


@register_model(
    family="resnet",
    paper="Bag of Tricks for Image Classification with Convolutional Neural Networks",
    year=2019,
    published_params=25_576_264,  # timm resnet50d / GluonCV resnet50_v1d
    published_macs=4_300_000_000,  # the paper, Table 5: 4.3 GFLOPs
    published_top1=77.16,  # the paper, Table 5 (architecture tweak alone; 79.15 with all refinements)
    description="ResNet-50-D: deep 3x3 stem and average-pool downsampling",
)
def resnet50d(num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0) -> ResNet:
    """ResNet-50-D."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_chans, deep_stem=True, avg_down=True,
                  drop_path_rate=drop_path_rate)


# --- Wide ResNet and ResNeXt (torchvision) ----------------------------------------------------------


def _register_wide_or_next(
    name: str, layers: tuple[int, int, int, int], groups: int, width: int, params: int, gmacs: float, top1: float,
    paper: str, year: int, description: str,
) -> None:
    @register_model(
        name,
        family="resnet",
        paper=paper,
        year=year,
        published_params=params,
        published_macs=round(gmacs * 1e9),
        published_top1=top1,
        description=description,
    )
    def build(num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0) -> ResNet:
        return ResNet(Bottleneck, layers, num_classes, in_chans, groups=groups, width_per_group=width,
                      drop_path_rate=drop_path_rate)


_WRN = ("Wide Residual Networks", 2016)
_RESNEXT = ("Aggregated Residual Transformations for Deep Neural Networks", 2017)
_register_wide_or_next("wide_resnet50_2", (3, 4, 6, 3), 1, 128, 68_883_240, 11.40, 78.468, *_WRN,
                       "Wide ResNet-50-2: ResNet-50 with a twice as wide bottleneck")
_register_wide_or_next("wide_resnet101_2", (3, 4, 23, 3), 1, 128, 126_886_696, 22.75, 78.848, *_WRN,
                       "Wide ResNet-101-2: ResNet-101 with a twice as wide bottleneck")
_register_wide_or_next("resnext50_32x4d", (3, 4, 6, 3), 32, 4, 25_028_904, 4.23, 77.618, *_RESNEXT,
                       "ResNeXt-50 32x4d: 32 groups of 4 channels in the 3x3 convolution")
_register_wide_or_next("resnext101_32x8d", (3, 4, 23, 3), 32, 8, 88_791_336, 16.41, 79.312, *_RESNEXT,
                       "ResNeXt-101 32x8d: 32 groups of 8 channels in the 3x3 convolution")


# --- SE-ResNet-50 and Res2Net-50 ---------------------------------------------------------------------


@register_model(
    family="resnet",
    paper="Squeeze-and-Excitation Networks",
    year=2018,
    published_params=28_088_024,  # timm seresnet50 (SE reduction 16, biased 1x1 SE convolutions)
    published_macs=4_100_000_000,  # timm: 4.1 GMACs (stride on the 3x3; the paper's Caffe model: 3.87 GFLOPs)
    published_top1=76.71,  # the paper, Table 2 (23.29% top-1 error, single 224 crop)
    description="SE-ResNet-50: squeeze-and-excitation (reduction 16) after each bottleneck's bn3",
)
def seresnet50(num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0) -> ResNet:
    """SE-ResNet-50."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_chans, drop_path_rate=drop_path_rate,
                  block_args={"use_se": True})


@register_model(
    family="resnet",
    paper="Res2Net: A New Multi-scale Backbone Architecture",
    year=2019,
    # The official implementation (Res2Net/Res2Net-PretrainedModels, res2net.py) builds exactly this
    # network; its README gives 25.70M parameters, 4.2 GFLOPs and 22.01% top-1 error.
    published_params=25_699_120,
    published_macs=4_200_000_000,
    published_top1=77.99,
    description="Res2Net-50 26w4s: 4 scales of 26 base-width channels in each bottleneck",
)
def res2net50_26w_4s(num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0) -> ResNet:
    """Res2Net-50 26w4s."""
    return ResNet(Bottle2neck, (3, 4, 6, 3), num_classes, in_chans, width_per_group=26,
                  drop_path_rate=drop_path_rate, block_args={"scale": 4})
