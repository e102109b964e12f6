"""DenseNet (Huang et al., "Densely Connected Convolutional Networks", 2017).

- DenseNet-121/161/169/201 for ImageNet in torchvision's layout (``features.conv0``,
  ``features.denseblock{i}.denselayer{j}.{norm1,conv1,norm2,conv2}``, ``features.transition{i}``,
  ``features.norm5``, ``classifier``), so torchvision state dicts load unchanged.
- DenseNet-BC-100 (k=12) for CIFAR as in the authors' implementation (liuzhuang13/DenseNet): a 3x3
  stem of 2k channels, three dense blocks of 16 bottleneck layers, compression 0.5, no conv biases.

Dense layers are pre-activation (BN-ReLU-conv): ``fuse()`` folds only the BN that follows a
convolution (``norm2`` after ``conv1``, ``norm0`` after the stem); the others stay as they are.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from convforge.models.base import Classifier
from convforge.models.registry import register_model

PAPER = "Densely Connected Convolutional Networks"


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (``bn_size * growth_rate`` channels), BN-ReLU-3x3 conv (``growth_rate``)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        x = self.conv2(self.relu2(self.norm2(x)))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each sees the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression), 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(Classifier):
    """Stem, dense blocks joined by compressing transitions, final BN-ReLU, global pool, linear.

    ``cifar_stem`` replaces the ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) by a single
    3x3 convolution, as in the authors' CIFAR networks.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        cifar_stem: bool = False,
    ) -> None:
        super().__init__()
        if cifar_stem:
            stem = [("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=3, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(num_features * compression)
                self.features.add_module(f"transition{i + 1}", Transition(num_features, out_features))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.num_features = num_features
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)


def _register(depth: int, growth_rate: int, blocks: tuple[int, ...], init: int, params: int, gmacs: float,
              top1: float) -> None:
    @register_model(
        f"densenet{depth}",
        family="densenet",
        paper=PAPER,
        year=2017,
        published_params=params,
        published_macs=round(gmacs * 1e9),
        published_top1=top1,
        description=f"DenseNet-{depth} (k={growth_rate}, torchvision layout)",
    )
    def build(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> DenseNet:
        return DenseNet(growth_rate, blocks, init, drop_rate=drop_rate, num_classes=num_classes, in_chans=in_chans)


# torchvision's documented parameter counts, GFLOPS (= GMACs) and IMAGENET1K_V1 top-1.
for _depth, _k, _blocks, _init, _params, _gmacs, _top1 in (
    (121, 32, (6, 12, 24, 16), 64, 7_978_856, 2.83, 74.434),
    (161, 48, (6, 12, 36, 24), 96, 28_681_000, 7.73, 77.138),
    (169, 32, (6, 12, 32, 32), 64, 14_149_480, 3.36, 75.600),
    (201, 32, (6, 12, 48, 32), 64, 20_013_928, 4.29, 76.896),
):
    _register(_depth, _k, _blocks, _init, _params, _gmacs, _top1)


@register_model(
    family="densenet",
    paper=PAPER,
    year=2017,
    input_size=(3, 32, 32),
    num_classes=10,
    # The paper (Table 2) gives 0.8M; this is the exact count of the authors' CIFAR-10 network
    # (liuzhuang13/DenseNet, models/densenet.lua: convolutions without biases).
    published_params=769_162,
    published_macs=None,
    published_top1=None,
    description="DenseNet-BC-100 (k=12) for CIFAR: 3 blocks of 16 bottleneck layers, compression 0.5",
)
def densenet_bc_100(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-BC-100 (k=12) for 32x32 images."""
    return DenseNet(12, (16, 16, 16), 24, drop_rate=drop_rate, num_classes=num_classes, in_chans=in_chans,
                    cifar_stem=True)
