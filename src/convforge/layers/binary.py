"""Binary weights and activations (XNOR-Net, DoReFa-Net) with straight-through gradients.

- ``xnor`` weights (Rastegari et al. 2016, "XNOR-Net"): ``alpha_c * sign(W_c)`` with ``alpha_c = mean |W_c|``
  per output channel. The gradient follows from that expression: through ``alpha`` and through the sign by
  the straight-through estimator clipped to ``|W| <= 1`` (the paper's ``1/n + alpha * 1_{|W|<=1}``).
- ``dorefa`` weights (Zhou et al. 2016, "DoReFa-Net", 1-bit case): ``E(|W|) * sign(W)`` with one scale per
  layer, and the gradient passed straight to ``W`` (unclipped).
- Binary activations (XNOR-Net, Bi-Real Net): ``sign(x)`` in {-1, +1} (0 counts as +1), gradient 1 where
  ``|x| <= 1`` and 0 outside (Hubara et al. 2016's clipped straight-through estimator).
- Bi-Real shortcuts (Liu et al. 2018, "Bi-Real Net"): the real-valued input of a binary convolution added to
  its (BatchNorm-ed) output, so the real values a sign throws away still reach the next layer.

torch has no binarisation with these gradients, hence the two small autograd functions below. The
binarised weights are exactly two values per output channel (``+-alpha_c``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BINARY_METHODS = ("xnor", "dorefa")


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class ClippedSign(torch.autograd.Function):
    """sign(x) in {-1, +1}; backward: the gradient where |x| <= 1, zero elsewhere."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class ScaledStraightSign(torch.autograd.Function):
    """``scale * sign(x)`` in {-scale, +scale}; backward: the gradient passed to ``x`` unchanged (DoReFa's
    estimator, dc/dW = dc/dW_b); ``scale`` gets none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return scale * _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def binary_activation(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with the clipped straight-through gradient."""
    return ClippedSign.apply(x)


def binarize_weight(weight: torch.Tensor, method: str = "xnor") -> torch.Tensor:
    """``weight`` binarised by ``method`` (``xnor``: per-output-channel mean |W|; ``dorefa``: per-layer)."""
    if method == "xnor":
        alpha = weight.abs().flatten(1).mean(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))
        return alpha * ClippedSign.apply(weight)
    if method == "dorefa":
        return ScaledStraightSign.apply(weight, weight.detach().abs().mean())
    raise ValueError(f"binary method must be one of {', '.join(BINARY_METHODS)}, got {method!r}")


class BinaryConv2d(nn.Module):
    """``conv`` with binarised weights and, with ``binary_input``, binarised inputs (its bias stays float)."""

    def __init__(self, conv: nn.Conv2d, method: str = "xnor", binary_input: bool = False) -> None:
        super().__init__()
        if method not in BINARY_METHODS:
            raise ValueError(f"binary method must be one of {', '.join(BINARY_METHODS)}, got {method!r}")
        self.conv, self.method, self.binary_input = conv, method, binary_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary_input:
            x = binary_activation(x)
        return self.conv._conv_forward(x, binarize_weight(self.conv.weight, self.method), self.conv.bias)

    def export_module(self) -> nn.Module:
        """A plain convolution with the binarised weights baked in (after an exact sign when ``binary_input``)."""
        with torch.no_grad():
            conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size, self.conv.stride,
                             self.conv.padding, self.conv.dilation, self.conv.groups, self.conv.bias is not None,
                             self.conv.padding_mode)
            conv.weight.copy_(binarize_weight(self.conv.weight, self.method))
            if self.conv.bias is not None:
                conv.bias.copy_(self.conv.bias)
        return nn.Sequential(SignActivation(), conv) if self.binary_input else conv

    def extra_repr(self) -> str:
        return f"method={self.method}, binary_input={self.binary_input}"


class BinaryLinear(nn.Module):
    """``linear`` with binarised weights and, with ``binary_input``, binarised inputs (its bias stays float)."""

    def __init__(self, linear: nn.Linear, method: str = "xnor", binary_input: bool = False) -> None:
        super().__init__()
        self.linear, self.method, self.binary_input = linear, method, binary_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary_input:
            x = binary_activation(x)
        return F.linear(x, binarize_weight(self.linear.weight, self.method), self.linear.bias)

    def export_module(self) -> nn.Module:
        with torch.no_grad():
            linear = nn.Linear(self.linear.in_features, self.linear.out_features, self.linear.bias is not None)
            linear.weight.copy_(binarize_weight(self.linear.weight, self.method))
            if self.linear.bias is not None:
                linear.bias.copy_(self.linear.bias)
        return nn.Sequential(SignActivation(), linear) if self.binary_input else linear


class SignActivation(nn.Module):
    """``sign(x)`` in {-1, +1} (0 counts as +1) with the clipped straight-through gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binary_activation(x) if torch.is_grad_enabled() and x.requires_grad else _sign(x)


class RealShortcut(nn.Module):
    """The real-valued path of a Bi-Real block: ``x`` averaged over ``stride x stride`` windows (when the
    convolution strides) and its channels repeated ``repeat`` times (when it widens), so that it matches the
    convolution's output. Parameter-free, as CIFAR ResNets' option-A shortcuts."""

    def __init__(self, stride: int = 1, repeat: int = 1) -> None:
        super().__init__()
        self.stride, self.repeat = stride, repeat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True, count_include_pad=False)
        return x.repeat(1, self.repeat, 1, 1) if self.repeat > 1 else x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, repeat={self.repeat}"
