"""Fake quantization for quantization-aware training (QAT): int8 weights, uint8 activations, BatchNorm folded.

The rounding is torch's own ``fake_quantize_per_channel_affine`` / ``fake_quantize_per_tensor_affine``:
their backward is the straight-through estimator (gradient 1 inside the quantization range, 0 outside),
and the TorchScript ONNX exporter turns them into QuantizeLinear/DequantizeLinear pairs.

- Weights: symmetric per output channel, int8, scale ``max|W_c| / 127`` computed from the weights at every
  step (weights need no running range: they are known).
- Activations: asymmetric per tensor, uint8, range = exponential moving average of the batch min/max
  (Jacob et al. 2018, section 3.1; TensorFlow's and the quantization whitepaper's default). An EMA rather
  than learned ranges (PACT/LSQ): nothing to tune when fine-tuning a trained float model, and the range
  is in the observer's buffers, so a checkpoint and a resumed run carry it exactly.
- BatchNorm folded into the convolution while training (Krishnamoorthi 2018, "Quantizing deep
  convolutional networks for efficient inference: a whitepaper", section 3.2; Jacob et al. 2018): the
  weights are folded with the running std and quantized; the batch statistics correct the output (the
  convolution output is divided back and normalised by BatchNorm with batch statistics, the approximation
  torch.ao's ConvBn2d also makes); once frozen (``bn_frozen``) or in eval mode the layer is exactly the
  folded inference convolution, with the running statistics.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127  # int8 weights; the symmetric scale max|W|/127 never reaches -128
WEIGHT_LEVEL = 127
EMA_MOMENTUM = 0.01  # weight of the new batch in the running min/max (torch.ao's MovingAverageMinMaxObserver)
MIN_SCALE = 1e-8


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 scale of ``weight`` (dimension 0 is the output channel)."""
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    return (amax / WEIGHT_LEVEL).clamp_min(MIN_SCALE).float()


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` rounded to per-channel symmetric int8 (straight-through gradient)."""
    scale = weight_scale(weight) if scale is None else scale
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    if weight.dtype != torch.float32:  # torch's fake quantization takes float32 (and a cast would break QDQ export)
        return fake_quant_weight(weight.float(), scale).to(weight.dtype)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, WEIGHT_QMIN, WEIGHT_QMAX)


def activation_qparams(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 scale and zero point of the range [low, high], widened to hold 0 exactly."""
    low, high = low.clamp(max=0.0).float(), high.clamp(min=0.0).float()
    scale = ((high - low) / (ACT_QMAX - ACT_QMIN)).clamp_min(MIN_SCALE)
    zero_point = (ACT_QMIN - low / scale).round().clamp(ACT_QMIN, ACT_QMAX).to(torch.int32)
    return scale.reshape(1), zero_point.reshape(1)


class ActivationFakeQuant(nn.Module):
    """uint8 per-tensor fake quantization with an EMA min/max range, updated in training mode only.

    Until it has seen a training batch it passes its input through unchanged.
    """

    def __init__(self, momentum: float = EMA_MOMENTUM) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach().float())
        if int(self.observed) == 0:
            self.min_val.copy_(low)
            self.max_val.copy_(high)
        else:
            self.min_val.lerp_(low, self.momentum)
            self.max_val.lerp_(high, self.momentum)
        self.observed += 1

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current (scale, zero point) as 1-element tensors."""
        return activation_qparams(self.min_val, self.max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        if int(self.observed) == 0:
            return x
        scale, zero_point = self.qparams()
        if x.dtype != torch.float32:
            return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, ACT_QMIN, ACT_QMAX).to(x.dtype)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)

    def extra_repr(self) -> str:
        return f"uint8, ema momentum={self.momentum}, range=[{float(self.min_val):.4g}, {float(self.max_val):.4g}]"


class QuantConv2d(nn.Module):
    """``conv`` (and the BatchNorm ``bn`` after it, folded) with per-channel int8 fake-quantized weights.

    Training, BN not frozen: ``bn(conv(x, Q(W * g / s_run)) / (g / s_run))``: BatchNorm normalises with the
    batch statistics and updates its running ones. Eval mode or ``bn_frozen``: ``conv(x, Q(W * g / s_run)) +
    (b - g * m_run / s_run)``, the folded convolution that an int8 runtime executes.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.register_buffer("bn_frozen", torch.zeros((), dtype=torch.bool))

    def folding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel multiplier ``g / s_run`` and additive term of the folded convolution (BN in eval mode)."""
        bn, conv = self.bn, self.conv
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=conv.weight.device)
        if bn is None:
            return torch.ones_like(bias), bias
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
        factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        return factor, beta + (bias - bn.running_mean) * factor

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded float weight and bias (what inference uses before rounding)."""
        factor, bias = self.folding()
        return self.conv.weight * factor.reshape(-1, 1, 1, 1), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if bn is not None and self.training and not bool(self.bn_frozen):
            factor, _ = self.folding()
            factor = torch.where(factor == 0, torch.ones_like(factor), factor)  # a zero gamma: BN outputs beta anyway
            y = conv._conv_forward(x, fake_quant_weight(conv.weight * factor.reshape(-1, 1, 1, 1)), None)
            y = y / factor.reshape(1, -1, 1, 1)
            if conv.bias is not None:
                y = y + conv.bias.reshape(1, -1, 1, 1)
            return bn(y)
        weight, bias = self.folded()
        return conv._conv_forward(x, fake_quant_weight(weight), bias)

    def export_module(self) -> nn.Module:
        """The eval-mode layer with its folded weight, scale and bias as constants (for ONNX export)."""
        with torch.no_grad():
            weight, bias = self.folded()
            return FrozenQuantConv2d(self.conv, weight.detach().float(), weight_scale(weight), bias.detach().float())

    def float_module(self) -> nn.Conv2d:
        """The folded convolution without rounding: the float model these weights make."""
        conv = self.conv
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, True, conv.padding_mode)
        with torch.no_grad():
            weight, bias = self.folded()
            folded.weight.copy_(weight)
            folded.bias.copy_(bias)
        return folded


class QuantLinear(nn.Module):
    """``linear`` with per-output-channel int8 fake-quantized weights (its bias stays float)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant_weight(self.linear.weight), self.linear.bias)

    def export_module(self) -> nn.Module:
        with torch.no_grad():
            weight = self.linear.weight.detach().float()
            return FrozenQuantLinear(weight, weight_scale(weight), self.linear.bias)

    def float_module(self) -> nn.Linear:
        """The linear layer without rounding."""
        return self.linear


class FrozenQuantConv2d(nn.Module):
    """A folded, fake-quantized convolution whose weight, scale and bias are buffers (traced as constants)."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"QAT export supports zero padding only, got padding_mode={conv.padding_mode!r}")
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, fake_quant_weight(self.weight, self.scale), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class FrozenQuantLinear(nn.Module):
    """A fake-quantized linear layer whose weight, scale and bias are buffers (traced as constants)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant_weight(self.weight, self.scale), self.bias)


class FrozenActivationQuant(nn.Module):
    """uint8 fake quantization with a fixed scale and zero point (Python numbers: traced as constants)."""

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self.scale, self.zero_point = scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, ACT_QMIN, ACT_QMAX)


def activation_export_module(quant: ActivationFakeQuant) -> nn.Module:
    """The fixed-range form of ``quant`` (Identity when it never observed a batch)."""
    if int(quant.observed) == 0:
        return nn.Identity()
    scale, zero_point = quant.qparams()
    return FrozenActivationQuant(float(scale), int(zero_point))
