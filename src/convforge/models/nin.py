"""Network In Network (Lin, Chen & Yan, "Network In Network", ICLR 2014), the CIFAR-10 model.

Three "mlpconv" layers, each a spatial convolution followed by two 1x1 convolutions ("cascaded
cross-channel parametric pooling", ``cccp``), as in the authors' released CIFAR-10 definition:
5x5 (192) - 1x1 (160) - 1x1 (96), 3x3/2 max-pool, dropout; 5x5 (192) - 1x1 (192) - 1x1 (192),
3x3/2 average pool, dropout; 3x3 (192) - 1x1 (192) - 1x1 (classes), global average pool. Pools
round up (Caffe), so 32x32 inputs give 16x16 and 8x8 maps. There is no fully connected layer: the
last 1x1 convolution makes one map per class and its spatial average is the logit (the paper's
"global average pooling" head); no BatchNorm (the paper predates it).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from convforge.models.base import Classifier
from convforge.models.registry import register_model


class NIN(Classifier):
    """Network In Network for 32x32 images; ``num_features`` (192) is the width of the map the last
    1x1 convolution reads (``forward_head(..., pre_logits=True)`` returns its spatial average)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.5) -> None:
        super().__init__()

        def conv(name: str, c_in: int, c_out: int, k: int) -> list[tuple[str, nn.Module]]:
            return [(name, nn.Conv2d(c_in, c_out, k, padding=k // 2)), (f"relu_{name}", nn.ReLU(inplace=True))]

        self.features = nn.Sequential(OrderedDict([
            *conv("conv1", in_chans, 192, 5), *conv("cccp1", 192, 160, 1), *conv("cccp2", 160, 96, 1),
            ("pool1", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
            ("drop1", nn.Dropout(drop_rate)),
            *conv("conv2", 96, 192, 5), *conv("cccp3", 192, 192, 1), *conv("cccp4", 192, 192, 1),
            ("pool2", nn.AvgPool2d(3, stride=2, ceil_mode=True)),
            ("drop2", nn.Dropout(drop_rate)),
            *conv("conv3", 192, 192, 3), *conv("cccp5", 192, 192, 1),
        ]))
        self.num_features = 192
        self.cccp6 = nn.Conv2d(192, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cccp6.weight, 0, 0.05)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return torch.flatten(self.pool(x), 1)
        return torch.flatten(self.pool(self.cccp6(x)), 1)


@register_model(
    family="nin",
    paper="Network In Network",
    year=2014,
    input_size=(3, 32, 32),
    num_classes=10,
    # The paper gives no count; this is the count of the authors' released CIFAR-10 definition
    # (the layer list above, convolutions with biases).
    published_params=966_986,
    description="Network In Network for CIFAR-10 (three mlpconv layers, global average pooling head)",
)
def nin(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.5) -> NIN:
    """Network In Network (CIFAR-10)."""
    return NIN(num_classes, in_chans, drop_rate=drop_rate)
