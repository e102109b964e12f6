"""The default small CNN for tiny images (8x8 digits, 28x28 MNIST, 32x32 CIFAR)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from convforge.layers import ConvNormAct
from convforge.models.base import Classifier
from convforge.models.registry import register_model


class SmallCNN(Classifier):
    """A stem conv, then stages of ``conv-BN-ReLU`` each followed by 2x2 max-pooling, global pooling, linear.

    ``stem_pool`` halves the resolution right after the stem, for 28x28 and larger inputs.
    """

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128), stem_pool: bool = False
    ) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.stem = ConvNormAct(in_chans, widths[0], 3)
        self.stem_pool = nn.MaxPool2d(2, ceil_mode=True) if stem_pool else nn.Identity()
        stages = []
        for c_in, c_out in itertools.pairwise(widths):
            stages.append(nn.Sequential(ConvNormAct(c_in, c_out, 3), nn.MaxPool2d(2, ceil_mode=True)))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem_pool(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x)


@register_model(
    family="smallcnn",
    input_size=(1, 8, 8),
    num_classes=10,
    description="Default small CNN for tiny images (3 conv layers, ~93k params)",
)
def smallcnn(
    num_classes: int = 10, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128), stem_pool: bool = False
) -> SmallCNN:
    """Default small CNN for tiny images."""
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, widths=tuple(widths), stem_pool=stem_pool)
