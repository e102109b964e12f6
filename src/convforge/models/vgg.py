"""VGG (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", 2015).

Configurations A (VGG-11), B (VGG-13), D (VGG-16) and E (VGG-19), with and without BatchNorm after
every convolution, in torchvision's layout (``features.{i}``, ``avgpool`` to 7x7, ``classifier.{0,3,6}``)
so torchvision state dicts load unchanged. Any input of 32x32 or more works: the adaptive pool
brings the last feature map to 7x7.
"""

from __future__ import annotations

import torch
from torch import nn

from convforge.models.base import Classifier, init_conv_bn_linear
from convforge.models.registry import register_model

PAPER = "Very Deep Convolutional Networks for Large-Scale Image Recognition"

# Output channels of each 3x3 convolution; "M" is a 2x2 max-pool.
CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(Classifier):
    """Stacks of 3x3 convolutions and max-pools, then three fully connected layers with dropout.

    ``num_features`` is 4096: ``forward_head(..., pre_logits=True)`` returns the output of the
    second fully connected layer (after its ReLU and dropout).
    """

    def __init__(
        self,
        config: list[int | str],
        num_classes: int = 1000,
        in_chans: int = 3,
        batch_norm: bool = False,
        drop_rate: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.num_features = 4096
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=drop_rate),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=drop_rate),
            nn.Linear(4096, num_classes),
        )
        init_conv_bn_linear(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        *hidden, last = self.classifier
        for layer in hidden:
            x = layer(x)
        return x if pre_logits else last(x)


def _register(depth: int, batch_norm: bool, params: int, gmacs: float, top1: float) -> None:
    name = f"vgg{depth}_bn" if batch_norm else f"vgg{depth}"

    @register_model(
        name,
        family="vgg",
        paper=PAPER,
        year=2015,
        published_params=params,
        published_macs=round(gmacs * 1e9),
        published_top1=top1,
        description=f"VGG-{depth}{' with BatchNorm' if batch_norm else ''} (torchvision layout)",
    )
    def build(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.5) -> VGG:
        return VGG(CONFIGS[depth], num_classes, in_chans, batch_norm=batch_norm, drop_rate=drop_rate)


# torchvision's documented parameter counts, GFLOPS (= GMACs) and IMAGENET1K_V1 top-1.
for _depth, _bn, _params, _gmacs, _top1 in (
    (11, False, 132_863_336, 7.61, 69.020),
    (13, False, 133_047_848, 11.31, 69.928),
    (16, False, 138_357_544, 15.47, 71.592),
    (19, False, 143_667_240, 19.63, 72.376),
    (11, True, 132_868_840, 7.61, 70.370),
    (13, True, 133_053_736, 11.31, 71.586),
    (16, True, 138_365_992, 15.47, 73.360),
    (19, True, 143_678_248, 19.63, 74.218),
):
    _register(_depth, _bn, _params, _gmacs, _top1)
