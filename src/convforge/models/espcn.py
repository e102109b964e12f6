"""ESPCN (Shi et al., CVPR 2016): convolutions on the low-resolution image, then sub-pixel
convolution (a convolution to ``scale^2`` channels per output channel and a pixel shuffle)."""

from __future__ import annotations

import torch
from torch import nn

from convforge.models.registry import register_model
from convforge.models.srcnn import SuperResolver, check_sr_args


class ESPCN(SuperResolver):
    """5x5 conv to 64, tanh, 3x3 conv to 32, tanh, 3x3 conv to ``channels * scale^2``, pixel shuffle.

    The input is the low-resolution image; the output is ``scale`` times its size. The paper does
    not state its initialisation: here every convolution is He-normal (fan-in) with the gain of the
    nonlinearity that follows it (5/3 for tanh, 1 for the last, linear layer), biases zero.
    """

    upsampled_input = False

    def __init__(self, channels: int = 1, scale: int = 3, widths: tuple[int, int] = (64, 32)) -> None:
        super().__init__()
        self.scale = scale
        n1, n2 = widths
        self.conv1 = nn.Conv2d(channels, n1, 5, padding=2)
        self.conv2 = nn.Conv2d(n1, n2, 3, padding=1)
        self.conv3 = nn.Conv2d(n2, channels * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        for conv, nonlinearity in ((self.conv1, "tanh"), (self.conv2, "tanh"), (self.conv3, "linear")):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity=nonlinearity)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.shuffle(self.conv3(x))


# The paper prints no parameter count, so none is registered. Its (5,64)-(3,32)-3 network for one channel
# at x3 has 1,600 + 18,432 + 2,592 = 22,624 weights (biases excluded, as SRCNN and FSRCNN count), 22,729
# parameters with the biases; the last layer grows with scale^2 (x2: 21,284, x4: 24,752 parameters).
@register_model(
    family="espcn",
    paper="Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network",
    year=2016,
    input_size=(1, 11, 11),
    num_classes=1,
    description="ESPCN super-resolution on the low-resolution image, sub-pixel convolution (tanh, 23k params at x3)",
)
def espcn(num_classes: int = 1, in_chans: int = 1, scale: int = 3) -> ESPCN:
    """ESPCN with (f1, n1) = (5, 64), (f2, n2) = (3, 32), f3 = 3."""
    check_sr_args("espcn", num_classes, in_chans, scale)
    return ESPCN(in_chans, scale)
