"""Anti-aliased downsampling (Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Rows of Pascal's triangle: the binomial low-pass filters of sizes 1 to 7.
_BINOMIAL = {n: [math.comb(n - 1, k) for k in range(n)] for n in range(1, 8)}


def binomial_filter(filter_size: int) -> torch.Tensor:
    """The normalised 2-D binomial filter ``b b^T`` of side ``filter_size`` (1 to 7)."""
    if filter_size not in _BINOMIAL:
        raise ValueError(f"BlurPool filter size must be 1 to 7, got {filter_size}")
    row = torch.tensor(_BINOMIAL[filter_size], dtype=torch.float64)
    kernel = row[:, None] * row[None, :]
    return (kernel / kernel.sum()).float()


class BlurPool(nn.Module):
    """Blur with a fixed binomial filter, then subsample: a drop-in for the stride of a pooling or conv layer.

    Each channel is filtered on its own (a depthwise convolution with a fixed, non-learnable
    filter) after reflect padding, so the output has ``ceil(H / stride)`` rows. ``filter_size`` 1
    is plain subsampling; 3 (``[1, 2, 1]``) and 5 (``[1, 4, 6, 4, 1]``) are the usual choices.
    Use ``MaxPool2d(2, stride=1)`` then ``BlurPool`` for the paper's "MaxBlurPool", and a stride-1
    conv then ``BlurPool`` for "ConvBlurPool".
    """

    def __init__(self, channels: int, filter_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.filter_size = filter_size
        self.stride = stride
        kernel = binomial_filter(filter_size)
        self.register_buffer("filt", kernel[None, None].repeat(channels, 1, 1, 1), persistent=False)
        # reflect padding, split as in the reference code (the extra pixel goes right/bottom)
        left = (filter_size - 1) // 2
        right = filter_size - 1 - left
        self.padding = (left, right, left, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.filter_size == 1:
            return x[:, :, :: self.stride, :: self.stride]
        x = F.pad(x, self.padding, mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=self.stride, groups=self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, filter_size={self.filter_size}, stride={self.stride}"
