"""LinkNet (Chaurasia & Culurciello, "LinkNet: Exploiting Encoder Representations for Efficient
Semantic Segmentation", 2017).

Encoder: the zoo's ResNet-18 (stem 7x7/2 conv and 3x3/2 max-pool, ``layer1``..``layer4``).
Decoder block for m input and n output channels (Fig. 3): 1x1 convolution m -> m/4, 3x3 full
(transposed) convolution m/4 -> m/4 with stride 2, 1x1 convolution m/4 -> n, each followed by
BatchNorm and ReLU; the output of decoder block i is added to the output of encoder block i-1 (the
"link"). Final block: 3x3 full convolution 64 -> 32 (stride 2), 3x3 convolution 32 -> 32, 2x2 full
convolution 32 -> classes (stride 2). 11.5 M parameters, as the paper reports.

In the paper every encoder block halves the resolution; ResNet-18's ``layer1`` does not, so here
decoder block 1 (64 -> 64) keeps the resolution (its full convolution has stride 1, the same
parameters), and the final block's two stride-2 full convolutions undo the stem's 4x, as in the
paper. Each transposed convolution is sized to the encoder map it is added to, and the logits are
resized bilinearly to the input at the end, so any input size works.
"""

from __future__ import annotations

import torch
from torch import nn

from convforge.models._segment import (
    SegmentationModel,
    conv_bn_relu,
    resize_to,
    resnet_encoder,
    resnet_stages,
)
from convforge.models.registry import register_model

PAPER = "LinkNet: Exploiting Encoder Representations for Efficient Semantic Segmentation"


class DecoderBlock(nn.Module):
    """1x1 conv m -> m/4, 3x3 full conv m/4 -> m/4 (stride ``stride``), 1x1 conv m/4 -> n; BN + ReLU after each."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 2) -> None:
        super().__init__()
        mid = in_chans // 4
        self.stride = stride
        self.conv1 = conv_bn_relu(in_chans, mid, 1)
        self.full_conv = nn.ConvTranspose2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv3 = conv_bn_relu(mid, out_chans, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        x = self.conv1(x)
        x = self.full_conv(x, output_size=list(size) if size is not None and self.stride > 1 else None)
        return self.conv3(self.relu(self.bn2(x)))


class LinkNet(SegmentationModel):
    """LinkNet with a ResNet-18 encoder (see the module docstring)."""

    def __init__(self, num_classes: int = 11, in_chans: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = resnet_encoder(18, in_chans)
        self.decoder4 = DecoderBlock(512, 256)
        self.decoder3 = DecoderBlock(256, 128)
        self.decoder2 = DecoderBlock(128, 64)
        self.decoder1 = DecoderBlock(64, 64, stride=1)
        self.final_full_conv1 = nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, bias=False)
        self.final_bn1 = nn.BatchNorm2d(32)
        self.final_relu = nn.ReLU(inplace=True)
        self.final_conv2 = conv_bn_relu(32, 32, 3, padding=1)
        self.final_full_conv3 = nn.ConvTranspose2d(32, num_classes, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem, e1, e2, e3, e4 = resnet_stages(self.backbone, x)
        d = self.decoder4(e4, e3.shape[-2:]) + e3
        d = self.decoder3(d, e2.shape[-2:]) + e2
        d = self.decoder2(d, e1.shape[-2:]) + e1
        d = self.decoder1(d)
        d = self.final_relu(self.final_bn1(self.final_full_conv1(d, output_size=list(stem.shape[-2:]))))
        d = self.final_full_conv3(self.final_conv2(d))
        return resize_to(d, x.shape[-2:])


@register_model(
    family="linknet",
    paper=PAPER,
    year=2017,
    input_size=(3, 180, 240),
    num_classes=11,
    published_params=11_500_000,  # the paper: 11.5 M parameters
    description="LinkNet: ResNet-18 encoder, light decoder blocks added to the encoder's outputs",
)
def linknet_resnet18(num_classes: int = 11, in_chans: int = 3) -> LinkNet:
    """LinkNet (ResNet-18 encoder)."""
    return LinkNet(num_classes, in_chans)
