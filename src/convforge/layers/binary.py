"""Binary weights and activations (XNOR-Net, DoReFa-Net) with straight-through gradients.

- ``xnor`` weights (Rastegari et al. 2016, "XNOR-Net"): ``alpha_c * sign(W_c)`` with ``alpha_c = mean |W_c|``
  per output channel. The gradient follows from that expression: through ``alpha`` and through the sign by
  the straight-through estimator clipped to ``|W| < 1`` (the paper's ``1/n + alpha * 1_{|W|<=1}``; the
  boundary, where hardtanh has no derivative, is left out).
- ``dorefa`` weights (Zhou et al. 2016, "DoReFa-Net", 1-bit case): ``E(|W|) * sign(W)`` with one scale per
  layer, and the gradient passed straight to ``W`` (unclipped).
- Binary activations (XNOR-Net, Bi-Real Net): ``sign(x)`` in {-1, +1} (0 counts as +1), gradient 1 where
  ``|x| < 1`` and 0 outside, the derivative of hardtanh (Hubara et al. 2016's clipped straight-through
  estimator, ``ste="clipped"``).
  ``ste="scaled"`` takes the same estimator on the input as a BatchNorm before the sign would give it (XNOR-Net's
  block order): the gradient of ``hardtanh(x / s)``, ``s`` each channel's batch standard deviation (detached),
  so a channel whose values spread far beyond +-1 (the real-valued sums of a Bi-Real network) still passes
  gradient; the forward value is the same sign.
- Bi-Real shortcuts (Liu et al. 2018, "Bi-Real Net"): the real-valued input of a binary convolution added to
  its (BatchNorm-ed) output, so the real values a sign throws away still reach the next layer.
- ReActNet's learnable activations (Liu et al. 2020): RSign, ``sign(x - t_c)`` with a learnable threshold per
  input channel (``learnable_threshold``), and :class:`RPReLU` on the real-valued path.

torch has no binarisation with these gradients, hence the two small autograd functions below. The
binarised weights are exactly two values per output channel (``+-alpha_c``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BINARY_METHODS = ("xnor", "dorefa")
BINARY_STES = ("clipped", "scaled")


def _sign(x: torch.Tensor) -> torch.Tensor:
    # sign(sign(x) + 0.5) maps 0 to +1: three cheap elementwise passes. torch.where(x >= 0, 1, -1) gives the
    # same values but took 5x as long on channels_last activations here (torch 2.13, CPU).
    return torch.sign(x).add_(0.5).sign_()


class ClippedSign(torch.autograd.Function):
    """sign(x) in {-1, +1}; backward: the gradient where |x| < 1, zero elsewhere (hardtanh's derivative)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, -1.0, 1.0)  # one fused pass; a float mask took 6x


class ScaledClippedSign(torch.autograd.Function):
    """sign(x) in {-1, +1}; backward: the derivative of hardtanh(x / s), ``1/s`` where |x| < s and zero
    elsewhere, ``s`` the standard deviation of x over every dimension but the channels (dimension 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dims = [d for d in range(x.dim()) if d != 1]
        if x.numel() // x.shape[1] < 2:  # one value per channel: no spread to measure
            scale = x.new_ones([1] * x.dim())
        else:
            scale = x.detach().std(dim=dims, keepdim=True, correction=0).clamp_min(1e-5)
        ctx.save_for_backward(x, scale)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, scale = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x / scale, -1.0, 1.0) / scale


class ScaledStraightSign(torch.autograd.Function):
    """``scale * sign(x)`` in {-scale, +scale}; backward: the gradient passed to ``x`` unchanged (DoReFa's
    estimator, dc/dW = dc/dW_b); ``scale`` gets none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return scale * _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def binary_activation(x: torch.Tensor, ste: str = "clipped") -> torch.Tensor:
    """``sign(x)`` with the clipped straight-through gradient (``ste="scaled"``: measured in units of each
    channel's standard deviation); the plain sign when no gradient is recorded (evaluation)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _sign(x)
    return ScaledClippedSign.apply(x) if ste == "scaled" else ClippedSign.apply(x)


def binarize_weight(weight: torch.Tensor, method: str = "xnor") -> torch.Tensor:
    """``weight`` binarised by ``method`` (``xnor``: per-output-channel mean |W|; ``dorefa``: per-layer)."""
    if method == "xnor":
        alpha = weight.abs().flatten(1).mean(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))
        return alpha * ClippedSign.apply(weight)
    if method == "dorefa":
        return ScaledStraightSign.apply(weight, weight.detach().abs().mean())
    raise ValueError(f"binary method must be one of {', '.join(BINARY_METHODS)}, got {method!r}")


class _BinaryLayer(nn.Module):
    """The settings the binary convolution and linear layers share: ``binary_weight`` (the weights
    binarised by ``method``; False keeps them real, as in the first stage of ReActNet's two-step training),
    ``binary_input`` (the inputs binarised) and ``threshold`` (RSign's learnable per-channel threshold the
    inputs are compared with, zero at the start; None: compared with 0)."""

    def __init__(self, method: str, binary_input: bool, binary_weight: bool, ste: str,
                 threshold_channels: int = 0) -> None:
        super().__init__()
        if method not in BINARY_METHODS:
            raise ValueError(f"binary method must be one of {', '.join(BINARY_METHODS)}, got {method!r}")
        if ste not in BINARY_STES:
            raise ValueError(f"binary activation gradient must be one of {', '.join(BINARY_STES)}, got {ste!r}")
        if not (binary_input or binary_weight):
            raise ValueError("a binary layer binarises its weights, its inputs or both")
        if threshold_channels and not binary_input:
            raise ValueError("a learnable threshold is a setting of binary inputs")
        self.method, self.binary_input, self.binary_weight, self.ste = method, binary_input, binary_weight, ste
        self.threshold = nn.Parameter(torch.zeros(threshold_channels)) if threshold_channels else None

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        return binarize_weight(weight, self.method) if self.binary_weight else weight

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.binary_input:
            return x
        return binary_activation(x if self.threshold is None else shift_channels(x, self.threshold), self.ste)

    def _exported(self, layer: nn.Module) -> nn.Module:
        if not self.binary_input:
            return layer
        if self.threshold is None:
            return nn.Sequential(SignActivation(), layer)
        return nn.Sequential(ChannelShift(self.threshold.detach().clone()), SignActivation(), layer)

    def extra_repr(self) -> str:
        return (f"method={self.method}, binary_input={self.binary_input}, binary_weight={self.binary_weight}, "
                f"ste={self.ste}, learnable_threshold={self.threshold is not None}")


class BinaryConv2d(_BinaryLayer):
    """``conv`` with binarised weights and/or inputs (its bias stays float)."""

    def __init__(self, conv: nn.Conv2d, method: str = "xnor", binary_input: bool = False,
                 binary_weight: bool = True, ste: str = "clipped", learnable_threshold: bool = False) -> None:
        super().__init__(method, binary_input, binary_weight, ste, conv.in_channels if learnable_threshold else 0)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(self._input(x), self._weight(self.conv.weight), self.conv.bias)

    def export_module(self) -> nn.Module:
        """A plain convolution with the (binarised) weights baked in, after an exact sign when ``binary_input``."""
        with torch.no_grad():
            conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size, self.conv.stride,
                             self.conv.padding, self.conv.dilation, self.conv.groups, self.conv.bias is not None,
                             self.conv.padding_mode)
            conv.weight.copy_(self._weight(self.conv.weight))
            if self.conv.bias is not None:
                conv.bias.copy_(self.conv.bias)
        return self._exported(conv)


class BinaryLinear(_BinaryLayer):
    """``linear`` with binarised weights and/or inputs (its bias stays float)."""

    def __init__(self, linear: nn.Linear, method: str = "xnor", binary_input: bool = False,
                 binary_weight: bool = True, ste: str = "clipped", learnable_threshold: bool = False) -> None:
        super().__init__(method, binary_input, binary_weight, ste,
                         linear.in_features if learnable_threshold else 0)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self._weight(self.linear.weight), self.linear.bias)

    def export_module(self) -> nn.Module:
        with torch.no_grad():
            linear = nn.Linear(self.linear.in_features, self.linear.out_features, self.linear.bias is not None)
            linear.weight.copy_(self._weight(self.linear.weight))
            if self.linear.bias is not None:
                linear.bias.copy_(self.linear.bias)
        return self._exported(linear)


class SignActivation(nn.Module):
    """``sign(x)`` in {-1, +1} (0 counts as +1) with the clipped straight-through gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binary_activation(x)


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


def shift_channels(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x`` minus ``shift[c]`` on each channel ``c`` (dimension 1) of an (N, C, ...) tensor."""
    return x - shift.reshape(1, -1, *([1] * (x.dim() - 2)))


class ChannelShift(nn.Module):
    """``x - shift[c]`` per channel, a fixed shift (RSign's trained threshold in an exported model)."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shift_channels(x, self.shift)


class RPReLU(nn.Module):
    """ReActNet's RPReLU (Liu et al. 2020): ``PReLU(x - gamma_c) + zeta_c`` with learnable per-channel shifts
    and slopes, the activation of the real-valued path of a binary network. It starts as ``nn.PReLU``'s default
    (slope 0.25) with no shifts."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.prelu = nn.PReLU(channels, init=0.25)
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shift_channels(self.prelu(shift_channels(x, self.shift_in)), -self.shift_out)

    def extra_repr(self) -> str:
        return f"channels={self.shift_in.numel()}"
