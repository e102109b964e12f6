"""The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", section 4.2).

Parameter names follow the widely used reference implementation (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv{1,2}``, ``linear``), so its trained checkpoints load directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convforge.layers.stochastic_depth import DropPath, linear_drop_path_rates
from convforge.models.base import Classifier
from convforge.models.registry import register_model

PAPER = "Deep Residual Learning for Image Recognition"


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, self.extra_channels - pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path_rate)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(planes - in_planes)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.drop_path(out) + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet-(6n+2) for 32x32 inputs: 3x3 stem, three stages of n blocks (16, 32, 64 channels)."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A",
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding) or 'B' (projection), got {shortcut!r}")
        blocks = (depth - 2) // 6
        rates = iter(linear_drop_path_rates(drop_path_rate, 3 * blocks))
        self.depth = depth
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut, next(rates)))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = 64
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.linear(x)


def _register(depth: int, published_params: float) -> None:
    @register_model(
        f"resnet{depth}",
        family="resnet_cifar",
        paper=PAPER,
        year=2016,
        input_size=(3, 32, 32),
        num_classes=10,
        published_params=round(published_params * 1e6),
        description=f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)",
    )
    def build(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", drop_path_rate: float = 0.0) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, in_chans=in_chans, shortcut=shortcut,
                           drop_path_rate=drop_path_rate)


# Table 6 of the paper: parameter counts of the CIFAR-10 ResNets.
for _depth, _params in ((20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7), (1202, 19.4)):
    _register(_depth, _params)
