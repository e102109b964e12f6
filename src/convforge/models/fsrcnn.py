"""FSRCNN (Dong, Loy and Tang, ECCV 2016): feature extraction, shrinking, mapping and expanding on the
low-resolution image, then a transposed convolution that upscales by ``scale``."""

from __future__ import annotations

import torch
from torch import nn

from convforge.models.registry import register_model
from convforge.models.srcnn import SuperResolver, check_sr_args


class FSRCNN(SuperResolver):
    """FSRCNN(d, s, m): 5x5 conv to d, 1x1 to s, m 3x3 convs at s, 1x1 back to d (each followed by a
    per-channel PReLU), then a 9x9 transposed convolution with stride ``scale``.

    The input is the low-resolution image; the transposed convolution has padding 4 and output
    padding ``scale - 1``, so the output is exactly ``scale`` times the input size (the paper's Caffe
    layer gives ``scale * (H - 1) + 1``). Initialisation as the paper: He-normal for the
    convolutions (fan-in, gain for PReLU slope 0.25, the slope's initial value), N(0, 0.001^2) for
    the transposed convolution, zero biases.
    """

    upsampled_input = False

    def __init__(self, channels: int = 1, scale: int = 3, d: int = 56, s: int = 12, m: int = 4) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(channels, d, 5, padding=2), nn.PReLU(d),
                                   nn.Conv2d(d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [nn.Conv2d(s, s, 3, padding=1), nn.PReLU(s)]
        layers += [nn.Conv2d(s, d, 1), nn.PReLU(d)]
        self.body = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(d, channels, 9, stride=scale, padding=4, output_padding=scale - 1)
        for module in self.body:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.25, mode="fan_in", nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.deconv.weight, 0.0, 0.001)
        nn.init.zeros_(self.deconv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.body(x))


# FSRCNN(56, 12, 4) has d(106 + 2s) + 9ms^2 = 12,464 weights (the paper's count, biases and PReLU
# slopes excluded); the module holds 12,464 + 173 biases + 172 slopes = 12,809 parameters.
@register_model(
    family="fsrcnn",
    paper="Accelerating the Super-Resolution Convolutional Neural Network",
    year=2016,
    input_size=(1, 11, 11),
    num_classes=1,
    published_params=12_464,
    description="FSRCNN(56,12,4) super-resolution on the low-resolution image, transposed-conv upscaling",
)
def fsrcnn(num_classes: int = 1, in_chans: int = 1, scale: int = 3) -> FSRCNN:
    """FSRCNN(56, 12, 4), the paper's main network."""
    check_sr_args("fsrcnn", num_classes, in_chans, scale)
    return FSRCNN(in_chans, scale)
