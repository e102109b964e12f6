"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022): Tiny, Small, Base, Large.

Patchify stem (4x4 stride 4 + LayerNorm), four stages of ConvNeXt blocks (7x7 depthwise, LayerNorm,
inverted MLP with GELU, layer scale, stochastic depth) joined by LayerNorm + 2x2 stride-2
downsampling. Layout and parameter names follow torchvision (``features.{i}.{j}.block.{k}``,
``features.{i}.{j}.layer_scale``, ``classifier.{0,2}``).

``dcls=True`` replaces every 7x7 depthwise convolution by a :class:`~convforge.layers.DclsConv2d`
with 34 learnable-position weights in a 17x17 kernel (the ConvNeXt-dcls setting of Khalfaoui-Hassani
et al. 2023); this changes the parameter count, so the published figures apply to ``dcls=False``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from convforge.layers import DclsConv2d, DropPath, linear_drop_path_rates
from convforge.models.base import Classifier
from convforge.models.registry import register_model

PAPER = "A ConvNet for the 2020s"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """``x + drop_path(gamma * mlp(norm(dwconv(x))))`` with per-channel layer scale ``gamma``."""

    def __init__(self, dim: int, layer_scale: float, drop_path_rate: float, dcls: bool = False) -> None:
        super().__init__()
        dwconv: nn.Module = (
            DclsConv2d(dim, kernel_count=34, dilated_kernel_size=17)
            if dcls
            else nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        )
        self.block = nn.Sequential(
            dwconv,
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.stochastic_depth = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXt(Classifier):
    def __init__(
        self,
        depths: tuple[int, ...],
        dims: tuple[int, ...],
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale: float = 1e-6,
        dcls: bool = False,
    ) -> None:
        super().__init__()
        rates = linear_drop_path_rates(drop_path_rate, sum(depths))
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        ]
        block_id = 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            layers.append(nn.Sequential(*(
                CNBlock(dim, layer_scale, rates[block_id + j], dcls=dcls) for j in range(depth)
            )))
            block_id += depth
            if i + 1 < len(dims):
                layers.append(nn.Sequential(
                    LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)
                ))
        self.features = nn.Sequential(*layers)
        self.num_features = dims[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.classifier[1](self.classifier[0](self.avgpool(x)))
        return x if pre_logits else self.classifier[2](x)


class Spec(NamedTuple):
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    drop_path_rate: float  # the paper's ImageNet-1k training value
    params: int  # torchvision's documented count
    gmacs: float  # torchvision's documented "GFLOPS" (multiply-adds) at 224
    top1: float  # torchvision's ImageNet top-1


SPECS = {
    "tiny": Spec((3, 3, 9, 3), (96, 192, 384, 768), 0.1, 28_589_128, 4.46, 82.520),
    "small": Spec((3, 3, 27, 3), (96, 192, 384, 768), 0.4, 50_223_688, 8.68, 83.616),
    "base": Spec((3, 3, 27, 3), (128, 256, 512, 1024), 0.5, 88_591_464, 15.36, 84.062),
    "large": Spec((3, 3, 27, 3), (192, 384, 768, 1536), 0.5, 197_767_336, 34.36, 84.414),
}


def _register(size: str, spec: Spec) -> None:
    @register_model(
        f"convnext_{size}",
        family="convnext",
        paper=PAPER,
        year=2022,
        published_params=spec.params,
        published_macs=round(spec.gmacs * 1e9),
        published_top1=spec.top1,
        description=f"ConvNeXt-{size[0].upper()} (depths {spec.depths}, widths {spec.dims})",
    )
    def build(
        num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = spec.drop_path_rate,
        layer_scale: float = 1e-6, dcls: bool = False,
    ) -> ConvNeXt:
        return ConvNeXt(spec.depths, spec.dims, num_classes=num_classes, in_chans=in_chans,
                        drop_path_rate=drop_path_rate, layer_scale=layer_scale, dcls=dcls)


for _size, _spec in SPECS.items():
    _register(_size, _spec)
