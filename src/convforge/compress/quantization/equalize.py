"""Cross-layer equalization and bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"), on a BatchNorm-folded PyTorch model before export.

Equalization: for consecutive convolutions ``conv1 -> [ReLU] -> conv2`` (the output of conv1 feeding conv2
alone, e.g. depthwise -> pointwise in MobileNetV2), output channel i of conv1 (weights and bias) is divided by
s_i and input channel i of conv2 multiplied by it, s_i = sqrt(r1_i * r2_i) / r2_i (r: the largest absolute
weight of the channel), so that both ranges become sqrt(r1_i * r2_i); ReLU(x / s) = ReLU(x) / s for s > 0
keeps the float function. Sweeps over all pairs repeat until no scale differs from 1 by more than the
tolerance. ReLU6 is not positively homogeneous: as in the paper, a ReLU6 between two equalized convolutions is
replaced by ReLU (the float model then differs only where that activation exceeded 6). Bias absorption is
not done.

Bias correction (the paper's empirical variant, with calibration images rather than BatchNorm statistics):
weight quantization shifts the mean output of a layer by (W_q - W) E[x]; every convolution and linear layer
subtracts that shift from its bias, with E[x] the per-channel mean of its input in the float model and W_q
ONNX Runtime's symmetric int8 weights (per channel or per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from convforge.errors import ConfigError
from convforge.layers.fuse import module_call_counts

_PASS_THROUGH = (nn.Identity, nn.Dropout)
_RELU_FUNCTIONS = (F.relu, torch.relu)


@dataclass(frozen=True)
class ConvPair:
    """Two convolutions, ``second`` reading the output of ``first`` through ``activation`` (a module name,
    ``"relu"`` for a functional ReLU, or ``None``)."""

    first: str
    second: str
    activation: str | None


def _second_conv_ok(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels


def _follow(node: torch.fx.Node, modules: dict[str, nn.Module], uses: dict[str, int]) -> ConvPair | None:
    """The pair that starts at the convolution ``node``, if its output reaches one convolution alone."""
    current, activation = node, None
    while len(current.users) == 1:
        user = next(iter(current.users))
        module = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(module, _PASS_THROUGH):
            current = user
        elif activation is None and isinstance(module, (nn.ReLU, nn.ReLU6)) and uses[user.target] == 1:
            current, activation = user, user.target
        elif activation is None and user.op == "call_function" and user.target in _RELU_FUNCTIONS:
            current, activation = user, "relu"
        elif (isinstance(module, nn.Conv2d) and uses[user.target] == 1 and user.args[0] is current
              and _second_conv_ok(module)):
            return ConvPair(node.target, user.target, activation)
        else:
            return None
    return None


def conv_pairs(model: nn.Module) -> list[ConvPair]:
    """The equalizable convolution pairs of ``model``, found by tracing it with torch.fx (each convolution
    called once; the first's output read only by the second, through at most one ReLU/ReLU6)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - an untraceable model has no pairs we can prove
        raise ConfigError(f"--equalize needs a model that torch.fx can trace ({type(exc).__name__}: "
                          f"{str(exc)[:160]}); quantize without --equalize") from None
    modules = dict(model.named_modules())
    uses = module_call_counts(graph)
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Conv2d) and uses[node.target] == 1:
            pair = _follow(node, modules, uses)
            if pair is not None:
                pairs.append(pair)
    return pairs


def replace_relu6(model: nn.Module, pairs: list[ConvPair]) -> list[str]:
    """Replace by ReLU every ReLU6 module between the convolutions of ``pairs`` (in place); their names."""
    replaced = []
    for pair in pairs:
        if pair.activation and pair.activation != "relu" and isinstance(model.get_submodule(pair.activation), nn.ReLU6):
            parent, _, attr = pair.activation.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.ReLU())
            replaced.append(pair.activation)
    return replaced


def output_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """Largest absolute weight of each output channel."""
    return conv.weight.detach().abs().flatten(1).amax(1)


def input_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """Largest absolute weight that reads each input channel of a plain or depthwise convolution (depthwise:
    its own filter)."""
    if not _second_conv_ok(conv):
        raise ConfigError(f"input ranges of a grouped convolution ({conv.groups} groups) are not defined here")
    w = conv.weight.detach().abs()
    return w.flatten(1).amax(1) if conv.groups > 1 else w.transpose(0, 1).flatten(1).amax(1)


@torch.no_grad()
def _equalize_pair(first: nn.Conv2d, second: nn.Conv2d) -> float:
    """Equalize one pair in place; the largest |log s_i| applied."""
    r1, r2 = output_ranges(first).double(), input_ranges(second).double()
    scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2.clamp_min(1e-300), torch.ones_like(r1))
    shape = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.div_(scale.to(first.weight.dtype).reshape(shape))
    if first.bias is not None:
        first.bias.div_(scale.to(first.bias.dtype))
    view = (-1, 1, 1, 1) if second.groups > 1 else (1, -1, 1, 1)
    second.weight.mul_(scale.to(second.weight.dtype).reshape(view))
    return float(scale.log().abs().max())


def range_balance(conv: nn.Conv2d) -> float:
    """Mean over output channels of (channel range / layer range): 1 when every channel uses the whole
    per-tensor int8 grid, near 0 when one channel dominates."""
    ranges = output_ranges(conv)
    return float(ranges.mean() / ranges.max()) if float(ranges.max()) > 0 else 1.0


def equalize(model: nn.Module, *, max_sweeps: int = 100, tolerance: float = 1e-6) -> dict[str, Any]:
    """Cross-layer equalization of the BatchNorm-folded ``model`` in place (see the module docstring).

    Returns a report: pairs, sweeps, ReLU6 modules replaced, and the mean :func:`range_balance` of the
    convolutions in pairs before and after."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("equalization needs a model with BatchNorm folded into its convolutions "
                          "(convforge.export.fold_for_inference)")
    pairs = conv_pairs(model)
    convs = sorted({name for pair in pairs for name in (pair.first, pair.second)})

    def balance() -> float:
        return sum(range_balance(model.get_submodule(n)) for n in convs) / max(len(convs), 1)

    before = balance()
    replaced = replace_relu6(model, pairs)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        change = max((_equalize_pair(model.get_submodule(p.first), model.get_submodule(p.second)) for p in pairs),
                     default=0.0)
        if change < tolerance:
            break
    return {"pairs": [[p.first, p.second] for p in pairs], "sweeps": sweeps, "relu6_replaced": replaced,
            "range_balance_before": before, "range_balance_after": balance()}


def quantize_weight(weight: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """ONNX Runtime's symmetric int8 weights, dequantized: scale = max |w| / 127 per output channel (or per
    tensor), values rounded and clipped to [-127, 127]."""
    bound = weight.abs().flatten(1).amax(1) if per_channel else weight.abs().max().expand(weight.shape[0])
    scale = torch.where(bound > 0, bound / 127, torch.ones_like(bound)).reshape((-1,) + (1,) * (weight.dim() - 1))
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def _weight_shift(layer: nn.Module, mean: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """(W_q - W) E[x] per output channel of a convolution or linear layer."""
    delta = quantize_weight(layer.weight.detach(), per_channel) - layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return delta @ mean
    groups = layer.groups
    per_group_out = layer.out_channels // groups
    means = mean.reshape(groups, -1).repeat_interleave(per_group_out, dim=0)  # O x (C / groups)
    return (delta.flatten(2).sum(2) * means).sum(1)


@torch.no_grad()
def correct_bias(model: nn.Module, calibration: torch.Tensor, *, per_channel: bool = True,
                 batch_size: int = 64) -> dict[str, Any]:
    """Empirical bias correction in place: every Conv2d and Linear subtracts (W_q - W) E[x] from its bias
    (created when absent), E[x] the mean input per channel over ``calibration`` in the float model.

    Returns ``{"layers": n, "mean_abs_shift": ...}`` (the average size of the corrections)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double()
            dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 2 else [0]
            sums[name] = sums.get(name, 0) + x.sum(dims)
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[1]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        model.eval()
        for i in range(0, len(calibration), batch_size):
            model(calibration[i:i + batch_size].float())
    finally:
        for handle in handles:
            handle.remove()
    shifts = []
    for name, layer in layers.items():
        if name not in sums:  # not reached by the forward pass
            continue
        shift = _weight_shift(layer, (sums[name] / counts[name]).to(layer.weight.dtype), per_channel)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        layer.bias.sub_(shift)
        shifts.append(float(shift.abs().mean()))
    return {"layers": len(shifts), "mean_abs_shift": sum(shifts) / max(len(shifts), 1)}
