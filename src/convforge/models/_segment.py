"""Shared pieces of the segmentation families (FCN, DeepLab, LinkNet, U-Net): the base class, the
zoo backbones as encoders, bilinear-initialised transposed convolutions, and the final resize."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convforge.layers.fuse import fold_batchnorm, fold_conv_bn
from convforge.models.resnet import _DEPTHS, BasicBlock, Bottle2neck, Bottleneck, ResNet
from convforge.models.vgg import CONFIGS, VGG


class SegmentationModel(nn.Module):
    """Base class of the dense predictors: ``forward(x)`` gives (N, num_classes, H, W) logits at the
    input's size, for any input size (down to each model's minimum)."""

    task = "segment"
    num_classes: int

    def fuse(self) -> SegmentationModel:
        """Fold BatchNorm into the preceding convolutions (eval mode, in place); returns ``self``.

        The whole model cannot be traced (its sizes depend on the input), so the ResNet blocks are
        folded one by one (each traces), then the stem, then the ``nn.Sequential`` conv-BN pairs."""
        self.eval()
        for module in list(self.modules()):
            if isinstance(module, (BasicBlock, Bottleneck, Bottle2neck)):
                fold_batchnorm(module)
        backbone = getattr(self, "backbone", None)
        if isinstance(backbone, ResNet) and isinstance(backbone.conv1, nn.Conv2d) and isinstance(backbone.bn1, nn.BatchNorm2d):
            fold_conv_bn(backbone.conv1, backbone.bn1)
            backbone.bn1 = nn.Identity()
        fold_batchnorm(self)
        return self


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of ``x`` to spatial ``size``; a no-op when it already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def resnet_encoder(depth: int, in_chans: int = 3, output_stride: int = 32) -> ResNet:
    """The zoo's ResNet-``depth`` (torchvision parameter names) without ``avgpool`` and ``fc``; an
    ``output_stride`` of 16 or 8 dilates ``layer4`` (and ``layer3``) instead of striding."""
    dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
    block, layers = _DEPTHS[depth]
    encoder = ResNet(block, layers, num_classes=1, in_chans=in_chans, replace_stride_with_dilation=dilate)
    del encoder.avgpool, encoder.fc
    return encoder


def resnet_stages(encoder: ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the stem (conv1/bn1/relu, stride 2), then layer1..layer4 (strides 4, 8, 16, 32 undilated)."""
    stem = encoder.relu(encoder.bn1(encoder.conv1(x)))
    c1 = encoder.layer1(encoder.maxpool(stem))
    c2 = encoder.layer2(c1)
    c3 = encoder.layer3(c2)
    return [stem, c1, c2, c3, encoder.layer4(c3)]


def vgg_encoder(depth: int = 16, in_chans: int = 3, batch_norm: bool = False) -> VGG:
    """The zoo's VGG-``depth`` keeping only ``features`` (torchvision parameter names ``features.{i}``)."""
    encoder = VGG(CONFIGS[depth], num_classes=1, in_chans=in_chans, batch_norm=batch_norm)
    del encoder.avgpool, encoder.classifier
    return encoder


def vgg_pool_ends(features: nn.Sequential) -> list[int]:
    """Index one past each max-pool of a VGG ``features`` stack (the ends of pool1..pool5)."""
    return [i + 1 for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]


def bilinear_upsampling_weight(channels: int, kernel_size: int) -> torch.Tensor:
    """A (channels, channels, k, k) transposed-convolution weight that upsamples each channel on its
    own by bilinear interpolation (FCN's initialisation of its learnable upsampling layers)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float32) - center).abs() / factor
    kernel = taps[:, None] * taps[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = kernel
    return weight


class Upsample2x(nn.ConvTranspose2d):
    """Learnable 2x upsampling of class scores (4x4 transposed convolution, stride 2, no bias),
    initialised to bilinear interpolation. ``forward(x, size)`` gives exactly ``size``, the size of
    the skip map it is fused with: 2h + 1 (a floor-mode pooling below) by one more output row, 2h - 1
    (a ceil-mode strided convolution below) by cropping the last row, as FCN crops its upsampled maps."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, kernel_size=4, stride=2, padding=1, bias=False)
        with torch.no_grad():
            self.weight.copy_(bilinear_upsampling_weight(channels, 4))

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:  # type: ignore[override]
        if size is None:
            return super().forward(x)
        full = [max(int(t), 2 * int(h)) for t, h in zip(size, x.shape[-2:])]
        return super().forward(x, output_size=full)[..., : int(size[0]), : int(size[1])]


def conv_bn_relu(in_chans: int, out_chans: int, kernel_size: int, padding: int = 0, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )
