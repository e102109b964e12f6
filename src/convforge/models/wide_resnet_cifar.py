"""Wide Residual Networks for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k: a 3x3 stem of 16 channels, three groups of (d - 4) / 6 pre-activation basic blocks of
16k, 32k and 64k channels (the 2nd and 3rd start with stride 2), final BN-ReLU, global average
pool, ``fc``. Where a block changes the width, the shortcut is a 1x1 convolution of the
pre-activated input. Convolutions have no bias. Parameter names follow the official PyTorch
implementation (szagoruyko/wide-residual-networks, ``pytorch/resnet.py``: ``conv0``,
``group{g}.block{i}.{bn0,conv0,bn1,conv1,convdim}``, ``bn``, ``fc``). ``drop_rate`` is the dropout
between the two convolutions of each block (0.3 in the paper's "-dropout" results);
``drop_path_rate`` adds stochastic depth on the residual branch (not in the paper; 0 by default).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from convforge.layers import DropPath, linear_drop_path_rates
from convforge.models.base import Classifier
from convforge.models.registry import register_model


class WideBlock(nn.Module):
    """BN-ReLU-3x3 conv (strided), BN-ReLU-[dropout]-3x3 conv, plus the identity or a 1x1 projection."""

    def __init__(self, ni: int, no: int, stride: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(ni)
        self.conv0 = nn.Conv2d(ni, no, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(no)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv1 = nn.Conv2d(no, no, 3, padding=1, bias=False)
        self.convdim = nn.Conv2d(ni, no, 1, stride=stride, bias=False) if ni != no else None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = F.relu(self.bn0(x))
        y = self.conv0(o1)
        z = self.conv1(self.dropout(F.relu(self.bn1(y))))
        shortcut = self.convdim(o1) if self.convdim is not None else x
        return self.drop_path(z) + shortcut


class WideResNetCifar(Classifier):
    """WRN-``depth``-``widen_factor`` for 32x32 images (depth = 6n + 4)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        rates = iter(linear_drop_path_rates(drop_path_rate, 3 * n))
        self.conv0 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        ni = 16
        for g, (no, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = OrderedDict()
            for i in range(n):
                blocks[f"block{i}"] = WideBlock(ni, no, stride if i == 0 else 1, drop_rate, next(rates))
                ni = no
            self.add_module(f"group{g}", nn.Sequential(blocks))
        self.bn = nn.BatchNorm2d(ni)
        self.num_features = ni
        self.fc = nn.Linear(ni, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        x = self.group2(self.group1(self.group0(x)))
        return F.relu(self.bn(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)


def _register(depth: int, width: int, params: int) -> None:
    @register_model(
        f"wrn{depth}_{width}",
        family="wide_resnet_cifar",
        paper="Wide Residual Networks",
        year=2016,
        input_size=(3, 32, 32),
        num_classes=10,
        published_params=params,
        description=f"Wide ResNet-{depth}-{width} for CIFAR",
    )
    def build(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
              drop_path_rate: float = 0.0) -> WideResNetCifar:
        return WideResNetCifar(depth, width, num_classes, in_chans, drop_rate=drop_rate,
                               drop_path_rate=drop_path_rate)


# The paper (Table 4/5) gives 2.7M and 36.5M; these are the official implementation's exact
# counts with 10 classes.
_register(16, 4, 2_748_890)
_register(28, 10, 36_479_194)
