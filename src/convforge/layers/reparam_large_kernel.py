"""Large-kernel depthwise convolution with structural re-parameterisation (Ding et al., RepLKNet, CVPR 2022)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(channels)))


def _fused_kernel_and_bias(branch: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    conv, bn = branch.conv, branch.bn
    std = torch.sqrt(bn.running_var + bn.eps)
    scale = bn.weight / std
    return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class ReparamLargeKernelConv(nn.Module):
    """Depthwise ``kernel_size`` conv + BN, with a parallel depthwise ``small_kernel`` conv + BN while training.

    The two branches are summed. :meth:`reparameterize` folds both BatchNorms, zero-pads the small
    kernel to the large one and adds them, leaving a single depthwise conv with bias
    (``lkb_reparam``) that computes the same function in eval mode. Parameter names follow the
    RepLKNet reference code (``lkb_origin``, ``small_conv``, ``lkb_reparam``).
    """

    def __init__(self, channels: int, kernel_size: int = 31, small_kernel: int | None = 5, stride: int = 1) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or (small_kernel is not None and small_kernel % 2 == 0):
            raise ValueError("kernel sizes must be odd")
        if small_kernel is not None and small_kernel > kernel_size:
            raise ValueError(f"small_kernel ({small_kernel}) must not exceed kernel_size ({kernel_size})")
        self.channels = channels
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.stride = stride
        self.lkb_origin: nn.Sequential | None = _conv_bn(channels, kernel_size, stride)
        self.small_conv: nn.Sequential | None = (
            _conv_bn(channels, small_kernel, stride) if small_kernel is not None else None
        )
        self.lkb_reparam: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lkb_reparam is not None:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def fused_kernel_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single large kernel and bias equal to the (eval-mode) sum of both branches."""
        if self.lkb_reparam is not None:
            return self.lkb_reparam.weight.clone(), self.lkb_reparam.bias.clone()
        kernel, bias = _fused_kernel_and_bias(self.lkb_origin)
        if self.small_conv is not None:
            small_kernel, small_bias = _fused_kernel_and_bias(self.small_conv)
            pad = (self.kernel_size - self.small_kernel) // 2
            kernel = kernel + F.pad(small_kernel, (pad, pad, pad, pad))
            bias = bias + small_bias
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> ReparamLargeKernelConv:
        """Replace both branches by one large-kernel conv with bias, for inference (in place; returns self)."""
        if self.lkb_reparam is not None:
            return self
        kernel, bias = self.fused_kernel_and_bias()
        conv = nn.Conv2d(
            self.channels, self.channels, self.kernel_size, self.stride, self.kernel_size // 2,
            groups=self.channels, bias=True,
        ).to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.lkb_reparam = conv
        self.lkb_origin = None
        self.small_conv = None
        return self

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
                f"stride={self.stride}, reparameterized={self.lkb_reparam is not None}")
