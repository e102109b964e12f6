"""The All-Convolutional Net (Springenberg, Dosovitskiy, Brox & Riedmiller, "Striving for
Simplicity: The All Convolutional Net", ICLR 2015 workshop), model All-CNN-C for CIFAR-10.

Table 1 of the paper, model C with every max-pool replaced by a stride-2 3x3 convolution:
input dropout 20%, 3x3 conv 96 x 2, 3x3 conv 96 stride 2, dropout 50%, 3x3 conv 192 x 2,
3x3 conv 192 stride 2, dropout 50%, 3x3 conv 192 (valid: 8x8 -> 6x6), 1x1 conv 192, 1x1 conv 10,
global average over 6x6, softmax. Every convolution is followed by a ReLU, the class-map one too
(as in Table 1). No BatchNorm, no fully connected layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from convforge.models.base import Classifier
from convforge.models.registry import register_model


class AllConvNet(Classifier):
    """All-CNN-C for 32x32 images. ``num_features`` (192) is the width of the map the class-map
    convolution reads; ``forward_head(..., pre_logits=True)`` returns its spatial average."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, input_drop_rate: float = 0.2,
                 drop_rate: float = 0.5) -> None:
        super().__init__()

        def conv(i: int, c_in: int, c_out: int, k: int = 3, stride: int = 1, padding: int = 1):
            return [(f"conv{i}", nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding)),
                    (f"relu{i}", nn.ReLU(inplace=True))]

        self.features = nn.Sequential(OrderedDict([
            ("drop0", nn.Dropout(input_drop_rate)),
            *conv(1, in_chans, 96), *conv(2, 96, 96), *conv(3, 96, 96, stride=2),
            ("drop1", nn.Dropout(drop_rate)),
            *conv(4, 96, 192), *conv(5, 192, 192), *conv(6, 192, 192, stride=2),
            ("drop2", nn.Dropout(drop_rate)),
            *conv(7, 192, 192, padding=0), *conv(8, 192, 192, k=1, padding=0),
        ]))
        self.num_features = 192
        self.conv9 = nn.Conv2d(192, num_classes, 1)
        self.relu9 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return torch.flatten(self.pool(x), 1)
        return torch.flatten(self.pool(self.relu9(self.conv9(x))), 1)


@register_model(
    family="allconv",
    paper="Striving for Simplicity: The All Convolutional Net",
    year=2015,
    input_size=(3, 32, 32),
    num_classes=10,
    # The paper gives a rounded figure only; this is the exact count of its Table 1 layer list
    # (convolutions with biases). No official implementation was released.
    published_params=1_369_738,
    description="All-CNN-C for CIFAR-10: strided convolutions instead of max-pooling, no dense layers",
)
def allconv(num_classes: int = 10, in_chans: int = 3, input_drop_rate: float = 0.2, drop_rate: float = 0.5):
    """All-CNN-C (CIFAR-10)."""
    return AllConvNet(num_classes, in_chans, input_drop_rate=input_drop_rate, drop_rate=drop_rate)
