"""Pre-activation ResNet-18 for CIFAR (He et al., "Identity Mappings in Deep Residual Networks", 2016).

The 18-layer network used as the CIFAR baseline of "mixup: Beyond Empirical Risk Minimization"
(Zhang et al., 2018), in its official implementation's layout (facebookresearch/mixup-cifar10,
``models/preact_resnet.py``): a 3x3 stem of 64 channels without BN, four stages of two
BN-ReLU-conv basic blocks (64, 128, 256, 512 channels), 1x1 projection shortcuts (no BN) taken
from the pre-activated input where the shape changes, global average pool, ``linear``.
11,171,146 parameters with 10 classes. Parameter names follow that implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convforge.models.base import Classifier
from convforge.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-3x3 conv, BN-ReLU-3x3 conv, plus the identity or a 1x1 projection of the activated input."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(Classifier):
    """Pre-activation ResNet for 32x32 images (any size works: the pool is global)."""

    def __init__(self, num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2), num_classes: int = 10,
                 in_chans: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.num_features = 512
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.linear(x)


@register_model(
    family="preact_resnet",
    paper="Identity Mappings in Deep Residual Networks",
    year=2016,
    input_size=(3, 32, 32),
    num_classes=10,
    published_params=11_171_146,  # the official mixup-cifar10 PreActResNet18 with 10 classes
    description="Pre-activation ResNet-18 for CIFAR (the mixup paper's baseline network)",
)
def preact_resnet18(num_classes: int = 10, in_chans: int = 3) -> PreActResNet:
    """Pre-activation ResNet-18 (CIFAR)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_chans)
