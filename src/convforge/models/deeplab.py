"""DeepLabv3 (Chen, Papandreou, Schroff & Adam, "Rethinking Atrous Convolution for Semantic Image
Segmentation", 2017): atrous spatial pyramid pooling on a dilated ResNet.

The encoder is the zoo's ResNet with its last stride(s) replaced by dilation: ``output_stride=16``
dilates ``layer4`` (rate 2), ``output_stride=8`` also ``layer3`` (rates 2 and 4). ASPP (Section 3.3
of the paper) has five parallel branches of 256 channels, each convolution followed by BatchNorm and
ReLU: a 1x1 convolution, three 3x3 atrous convolutions with rates (6, 12, 18) at output stride 16 and
doubled, (12, 24, 36), at output stride 8, and image pooling (global average, 1x1 convolution,
bilinear upsampling). Their concatenation goes through a 1x1 projection to 256 channels (BatchNorm,
ReLU; dropout 0.1 as in the official TensorFlow implementation) and a final 1x1 convolution to the classes;
the logits are upsampled bilinearly to the input size.

Notes: the paper's head has no extra 3x3 convolution after the projection (torchvision's
``DeepLabHead`` adds one, and an auxiliary FCN head on ``layer3``; neither is here), and the
multi-grid unit rates of the paper's ResNet-101 block4 are not used (every dilated block has the
stage's rate, as torchvision). The image-pooling branch uses BatchNorm on a 1x1 map, so training
needs at least 2 images per batch (per process). The paper trains at output stride 16 and
evaluates at 8; the builders default to 16 (about 4x cheaper on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convforge.errors import ConfigError
from convforge.models._segment import (
    SegmentationModel,
    conv_bn_relu,
    resize_to,
    resnet_encoder,
    resnet_stages,
)
from convforge.models.registry import register_model

PAPER = "Rethinking Atrous Convolution for Semantic Image Segmentation"
RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


class ASPPPooling(nn.Module):
    """Image-level features: global average pooling, 1x1 convolution + BN + ReLU, upsampled back."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(in_chans, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three 3x3 atrous (``rates``), image pooling; concatenated
    and projected by a 1x1 convolution."""

    def __init__(self, in_chans: int, rates: tuple[int, int, int], out_chans: int = 256, drop_rate: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_chans, out_chans, 1)]
            + [conv_bn_relu(in_chans, out_chans, 3, padding=rate, dilation=rate) for rate in rates]
            + [ASPPPooling(in_chans, out_chans)]
        )
        self.project = nn.Sequential(conv_bn_relu(len(self.branches) * out_chans, out_chans, 1), nn.Dropout(drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], 1))


class DeepLabV3(SegmentationModel):
    """DeepLabv3: dilated ResNet-``depth`` encoder (``output_stride`` 8 or 16), ASPP, 1x1 classifier."""

    def __init__(
        self,
        depth: int = 50,
        num_classes: int = 21,
        in_chans: int = 3,
        output_stride: int = 16,
        aspp_channels: int = 256,
        drop_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if output_stride not in RATES:
            raise ConfigError(f"output_stride must be 8 or 16, got {output_stride}")
        self.num_classes, self.output_stride = num_classes, output_stride
        self.backbone = resnet_encoder(depth, in_chans, output_stride)
        self.aspp = ASPP(self.backbone.num_features, RATES[output_stride], aspp_channels, drop_rate)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = resnet_stages(self.backbone, x)[-1]
        return resize_to(self.classifier(self.aspp(features)), x.shape[-2:])


def _register(depth: int) -> None:
    @register_model(
        f"deeplabv3_resnet{depth}",
        family="deeplab",
        paper=PAPER,
        year=2017,
        input_size=(3, 180, 240),
        num_classes=21,
        description=f"DeepLabv3: ASPP on a dilated ResNet-{depth} (output_stride 16 or 8)",
    )
    def build(num_classes: int = 21, in_chans: int = 3, output_stride: int = 16, drop_rate: float = 0.1) -> DeepLabV3:
        return DeepLabV3(depth, num_classes, in_chans, output_stride=output_stride, drop_rate=drop_rate)


for _depth in (18, 50):
    _register(_depth)
