"""SRCNN (Dong et al., ECCV 2014 / TPAMI 2016): three convolutions on the bicubic-upscaled image.

Also the small pieces every super-resolution model here shares: ``SuperResolver`` (the attributes
the engine reads) and ``check_sr_args`` (the builders' argument checks).
"""

from __future__ import annotations

import torch
from torch import nn

from convforge.errors import ConfigError
from convforge.models.registry import register_model

SRCNN_PAPER = "Image Super-Resolution Using Deep Convolutional Networks"


class SuperResolver(nn.Module):
    """Base class of the super-resolution models: image in, image out.

    ``upsampled_input`` says whether the model takes the bicubic-upscaled image (output size =
    input size) or the low-resolution image itself (output size = ``scale`` x input size).
    """

    task = "super-resolve"
    scale: int
    upsampled_input: bool


def check_sr_args(name: str, num_classes: int, in_chans: int, scale: int) -> None:
    """Refuse an output channel count other than ``in_chans`` or a scale that is not an integer >= 1."""
    if num_classes != in_chans:
        raise ConfigError(
            f"{name} is a super-resolution model: its output has as many channels as its input, but "
            f"num_classes={num_classes} and in_chans={in_chans}; pass num_classes={in_chans}"
        )
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"{name}: scale must be an integer >= 1 (2, 3 or 4 in the papers), got {scale!r}")


class SRCNN(SuperResolver):
    """``f1 x f1`` conv to 64, ReLU, ``f2 x f2`` conv to 32, ReLU, ``f3 x f3`` conv to ``channels``.

    The paper's convolutions are 'valid' (the output loses ``f1 + f2 + f3 - 3`` pixels); here every
    convolution is zero-padded ('same'), so the output has the size of the input. The input is the
    low-resolution image upscaled by bicubic interpolation to the output size (``upsampled_input``);
    ``scale`` is recorded for the data pipeline only and does not change the network.
    """

    upsampled_input = True

    def __init__(self, channels: int = 1, scale: int = 3, kernels: tuple[int, int, int] = (9, 1, 5),
                 widths: tuple[int, int] = (64, 32)) -> None:
        super().__init__()
        self.scale = scale
        f1, f2, f3 = kernels
        n1, n2 = widths
        self.conv1 = nn.Conv2d(channels, n1, f1, padding=f1 // 2)
        self.conv2 = nn.Conv2d(n1, n2, f2, padding=f2 // 2)
        self.conv3 = nn.Conv2d(n2, channels, f3, padding=f3 // 2)
        self.relu = nn.ReLU(inplace=True)
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.normal_(conv.weight, 0.0, 0.001)  # the paper: N(0, 0.001^2) weights, zero biases
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))


# The papers count weights only (no biases): 9-1-5 has 8,032 (TPAMI 2016, Sec. 4.3), 9-5-5 has 57,184;
# with the biases the modules hold 8,129 and 57,281 parameters.
@register_model(
    family="srcnn",
    paper=SRCNN_PAPER,
    year=2014,
    input_size=(1, 33, 33),
    num_classes=1,
    published_params=8_032,
    description="SRCNN 9-1-5 super-resolution on the bicubic-upscaled image (8k weights, 'same' padding)",
)
def srcnn_915(num_classes: int = 1, in_chans: int = 1, scale: int = 3) -> SRCNN:
    """SRCNN 9-1-5 (64 and 32 filters), the ECCV 2014 network."""
    check_sr_args("srcnn_915", num_classes, in_chans, scale)
    return SRCNN(in_chans, scale, kernels=(9, 1, 5))


@register_model(
    family="srcnn",
    paper=SRCNN_PAPER,
    year=2016,
    input_size=(1, 33, 33),
    num_classes=1,
    published_params=57_184,
    description="SRCNN 9-5-5 super-resolution on the bicubic-upscaled image (57k weights, 'same' padding)",
)
def srcnn_955(num_classes: int = 1, in_chans: int = 1, scale: int = 3) -> SRCNN:
    """SRCNN 9-5-5 (64 and 32 filters), the TPAMI 2016 network with a 5x5 mapping layer."""
    check_sr_args("srcnn_955", num_classes, in_chans, scale)
    return SRCNN(in_chans, scale, kernels=(9, 5, 5))
