"""Fully convolutional networks (Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015).

- ``fcn32s_vgg16``, ``fcn16s_vgg16``, ``fcn8s_vgg16``: the zoo's VGG-16 ``features``, then fc6 and
  fc7 as convolutions ("convolutionalized"; by default as in the paper: 4096 channels, fc6 7x7,
  dropout 0.5), a 1x1 class-score layer ``score_fr``, and for 16s/8s the skip fusion: scores from
  pool4 (``score_pool4``) added to the 2x-upsampled top scores (``upscore2``), and for 8s scores from
  pool3 (``score_pool3``) added to those upsampled again (``upscore_pool4``). The 2x upsamplings are
  learnable 4x4 transposed convolutions initialised to bilinear interpolation, as in the paper; the
  final 8x/16x/32x upsampling to the input size is fixed bilinear interpolation (the paper's
  frozen bilinear deconvolution). Score layers start at zero, as in the paper.
- The paper's fc6 (7x7x512 -> 4096, 103 M parameters) is most of the network's 134 M. ``fc_width``
  and ``fc6_kernel`` shrink it (e.g. ``fc_width=1024, fc6_kernel=3``, 20.5 M parameters in all, the
  reduced fc of DeepLab-LargeFOV) for CPU budgets; the defaults are the paper's configuration.
- ``fcn{32,16,8}s_resnet{18,50}``: the same heads on the zoo's ResNet (He et al. 2016): class scores
  from ``layer4`` (stride 32), fused with ``layer3`` (stride 16) and ``layer2`` (stride 8) in place
  of pool4 and pool3. No fc6/fc7: ``layer4`` already has 512 or 2048 channels.

The paper pads the input by 100 pixels and crops the upsampled maps; here the convolutions are
"same"-padded (fc6 with kernel // 2), each 2x upsampling is sized to the skip map it is added to
(2h or 2h+1), and the final scores are resized bilinearly to the input, so any input size works
(at least 32x32 for VGG, whose five 2x2 poolings floor). Parameter names of the backbone are the
zoo's (``backbone.features.{i}``, ``backbone.layer{1..4}``), i.e. torchvision's, so ImageNet weights
can be loaded into it.
"""

from __future__ import annotations

import torch
from torch import nn

from convforge.errors import ConfigError
from convforge.models._segment import (
    SegmentationModel,
    Upsample2x,
    resize_to,
    resnet_encoder,
    resnet_stages,
    vgg_encoder,
    vgg_pool_ends,
)
from convforge.models.registry import register_model

PAPER = "Fully Convolutional Networks for Semantic Segmentation"
STRIDES = (32, 16, 8)


class FCN(SegmentationModel):
    """FCN-32s/16s/8s on a VGG-16 (``backbone="vgg16"``) or ResNet-18/50 (``"resnet18"``, ``"resnet50"``) encoder."""

    def __init__(
        self,
        backbone: str = "vgg16",
        stride: int = 8,
        num_classes: int = 21,
        in_chans: int = 3,
        fc_width: int = 4096,
        fc6_kernel: int = 7,
        drop_rate: float = 0.5,
    ) -> None:
        super().__init__()
        if stride not in STRIDES:
            raise ConfigError(f"FCN stride must be one of {STRIDES}, got {stride}")
        self.num_classes, self.stride, self.backbone_name = num_classes, stride, backbone
        if backbone == "vgg16":
            if fc6_kernel < 1 or fc6_kernel % 2 == 0:
                raise ConfigError(f"fc6_kernel must be odd, got {fc6_kernel}")
            self.backbone: nn.Module = vgg_encoder(16, in_chans)
            self._pool_ends = vgg_pool_ends(self.backbone.features)
            skip_channels = (256, 512)
            self.head: nn.Module = nn.Sequential(  # fc6, fc7 as convolutions
                nn.Conv2d(512, fc_width, fc6_kernel, padding=fc6_kernel // 2),
                nn.ReLU(inplace=True),
                nn.Dropout(drop_rate),
                nn.Conv2d(fc_width, fc_width, 1),
                nn.ReLU(inplace=True),
                nn.Dropout(drop_rate),
            )
            top_channels = fc_width
        elif backbone in ("resnet18", "resnet50"):
            self.backbone = resnet_encoder(int(backbone[6:]), in_chans)
            expansion = 1 if backbone == "resnet18" else 4
            skip_channels = (128 * expansion, 256 * expansion)
            self.head = nn.Identity()
            top_channels = 512 * expansion
        else:
            raise ConfigError(f"unknown FCN backbone {backbone!r}: use vgg16, resnet18 or resnet50")
        self.score_fr = nn.Conv2d(top_channels, num_classes, 1)
        self.score_pool4 = nn.Conv2d(skip_channels[1], num_classes, 1) if stride <= 16 else None
        self.upscore2 = Upsample2x(num_classes) if stride <= 16 else None
        self.score_pool3 = nn.Conv2d(skip_channels[0], num_classes, 1) if stride == 8 else None
        self.upscore_pool4 = Upsample2x(num_classes) if stride == 8 else None
        for score in (self.score_fr, self.score_pool4, self.score_pool3):
            if score is not None:
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stride-8, stride-16 and stride-32 feature maps (pool3, pool4, pool5 or layer2..4)."""
        if self.backbone_name == "vgg16":
            ends = self._pool_ends
            out = []
            for i, layer in enumerate(self.backbone.features[: ends[4]]):
                x = layer(x)
                if i + 1 in (ends[2], ends[3], ends[4]):
                    out.append(x)
            return out[0], out[1], out[2]
        _, _, c2, c3, c4 = resnet_stages(self.backbone, x)
        return c2, c3, c4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        f8, f16, f32 = self._features(x)
        score = self.score_fr(self.head(f32))
        if self.upscore2 is not None:
            score = self.upscore2(score, f16.shape[-2:]) + self.score_pool4(f16)
        if self.upscore_pool4 is not None:
            score = self.upscore_pool4(score, f8.shape[-2:]) + self.score_pool3(f8)
        return resize_to(score, size)


def _register_vgg(stride: int) -> None:
    @register_model(
        f"fcn{stride}s_vgg16",
        family="fcn",
        paper=PAPER,
        year=2015,
        input_size=(3, 180, 240),
        num_classes=21,
        published_params=134_000_000,  # Table 1: FCN-VGG16, 134M (21 PASCAL VOC classes)
        description=f"FCN-{stride}s on VGG-16 (paper's fc6 7x7x4096; fc_width/fc6_kernel shrink it)",
    )
    def build(
        num_classes: int = 21, in_chans: int = 3, fc_width: int = 4096, fc6_kernel: int = 7, drop_rate: float = 0.5
    ) -> FCN:
        return FCN("vgg16", stride, num_classes, in_chans, fc_width=fc_width, fc6_kernel=fc6_kernel, drop_rate=drop_rate)


def _register_resnet(stride: int, depth: int) -> None:
    @register_model(
        f"fcn{stride}s_resnet{depth}",
        family="fcn",
        paper=PAPER,
        year=2015,
        input_size=(3, 180, 240),
        num_classes=21,
        description=f"FCN-{stride}s heads on ResNet-{depth} (skips from layer3/layer2)",
    )
    def build(num_classes: int = 21, in_chans: int = 3) -> FCN:
        return FCN(f"resnet{depth}", stride, num_classes, in_chans)


for _stride in STRIDES:
    _register_vgg(_stride)
for _depth in (18, 50):
    for _stride in STRIDES:
        _register_resnet(_stride, _depth)
