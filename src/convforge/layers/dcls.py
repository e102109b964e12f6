"""Dilated convolution with learnable spacings (Khalfaoui-Hassani, Pellegrini, Masquelier, ICLR 2023).

A depthwise convolution whose ``kernel_count`` weights per channel sit at learnable, real-valued
positions inside a ``dilated_kernel_size`` square. Each forward pass interpolates the weights
into a dense kernel (bilinearly, or with a Gaussian of learnable width as in the DCLS-Gauss
follow-up) and runs an ordinary depthwise convolution, so the positions receive gradients
through the interpolation coefficients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_INTERPOLATIONS = ("bilinear", "gaussian")


class DclsConv2d(nn.Module):
    """Depthwise DCLS convolution: a drop-in for ``nn.Conv2d(channels, channels, k, groups=channels)``.

    Parameters (names as in the reference ``Dcls2d``): ``weight`` ``(channels, 1, kernel_count)``;
    ``P`` ``(2, channels, 1, kernel_count)``, the row and column offset of every weight from the
    kernel centre, kept within ``+-(dilated_kernel_size // 2)``; ``SIG`` (Gaussian only), the
    per-element widths (``|SIG| + 0.27`` pixels). Padding keeps the spatial size ("same") at
    stride 1.
    """

    def __init__(
        self,
        channels: int,
        kernel_count: int,
        dilated_kernel_size: int,
        stride: int = 1,
        bias: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        if dilated_kernel_size % 2 == 0:
            raise ValueError(f"dilated_kernel_size must be odd, got {dilated_kernel_size}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        self.channels = channels
        self.kernel_count = kernel_count
        self.dilated_kernel_size = dilated_kernel_size
        self.stride = stride
        self.interpolation = interpolation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_count))
        self.P = nn.Parameter(torch.empty(2, channels, 1, kernel_count))
        self.SIG = nn.Parameter(torch.empty(2, channels, 1, kernel_count)) if interpolation == "gaussian" else None
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    @property
    def limit(self) -> int:
        return self.dilated_kernel_size // 2

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.kernel_count)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.normal_(self.P, 0.0, 0.5).clamp_(-self.limit, self.limit)
        if self.SIG is not None:
            nn.init.constant_(self.SIG, 0.23)

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Keep the positions inside the dilated kernel (call after each optimiser step, as the paper does)."""
        self.P.clamp_(-self.limit, self.limit)

    def _axis_coefficients(self, axis: int) -> torch.Tensor:
        """Interpolation coefficients ``(channels, kernel_count, dilated_kernel_size)`` along one axis."""
        size = self.dilated_kernel_size
        pos = self.P[axis, :, 0].clamp(-self.limit, self.limit) + self.limit  # index space, [0, size - 1]
        taps = torch.arange(size, device=pos.device, dtype=pos.dtype)
        if self.interpolation == "bilinear":
            # (1 - r) on the tap below the position, r on the tap above: differentiable in the position
            # everywhere, including at integer positions.
            below = pos.detach().floor()
            frac = (pos - below)[..., None]
            return (1 - frac) * (taps == below[..., None]) + frac * (taps == below[..., None] + 1)
        sigma = self.SIG[axis, :, 0].abs()[..., None] + 0.27
        return torch.exp(-0.5 * ((taps - pos[..., None]) / sigma) ** 2)

    def dense_weight(self) -> torch.Tensor:
        """The dense depthwise kernel ``(channels, 1, S, S)`` that the forward pass convolves with."""
        rows, cols = self._axis_coefficients(0), self._axis_coefficients(1)
        weight = self.weight[:, 0]
        if self.interpolation == "gaussian":  # each element's Gaussian footprint sums to one
            weight = weight / (rows.sum(-1) * cols.sum(-1) + 1e-7)
        return torch.einsum("ck,cki,ckj->cij", weight, rows, cols).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.limit, groups=self.channels)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_count={self.kernel_count}, dilated_kernel_size={self.dilated_kernel_size}, "
                f"stride={self.stride}, interpolation={self.interpolation}, bias={self.bias is not None}")
