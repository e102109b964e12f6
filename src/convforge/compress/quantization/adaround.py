"""Sub-8-bit weights (default 4) on a per-channel grid, by AdaRound (Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization") or by rounding to nearest, after BatchNorm folding.

Grid: symmetric signed per output channel, integers -2^(b-1) .. 2^(b-1)-1 (16 levels at 4 bits) times a
per-channel scale chosen by a grid search minimising the channel's squared rounding error ("mse", default) or
max|w| / (2^(b-1)-1) ("minmax"). The first and the last quantized layer stay at 8 bits by default, as is common
practice; pass ``first_last_bits=None`` to quantize them at ``bits`` too.

AdaRound, layer by layer in execution order: the rounding of each weight (down, or up) is the hard decision of a
rectified sigmoid h(V) (zeta 1.1, gamma -0.1) trained with Adam on batches of 32 calibration inputs to
minimise ||W x + b - (W~ x~ + b)||^2 (summed over channels, averaged over batch and positions) plus
0.01 * sum(1 - |2h(V) - 1|^beta), with beta annealed linearly from 20 to 2 after 20% of the iterations without the
regulariser (BRECQ's schedule). x is the float model's input to the layer; x~ is the input of the model whose
earlier layers are already quantized (the paper's asymmetric reconstruction), so each layer also corrects the error
that reaches it. The target is the layer's pre-activation output (the following non-linearity is not part of it:
in residual networks it comes after the addition). Activations are not quantized here: int8 activations come at
export (ONNX Runtime QDQ, :mod:`convforge.compress.quantization.grid_onnx`). The paper runs 10k iterations per layer
at lr 1e-3; the default here is 1,000 iterations (a ResNet-56 in minutes on two CPU cores) at lr 1e-2, so that V can
still travel as far (Adam's step is about lr; at 1e-3, 500 steps left ~75% of h(V) undecided on a digits CNN).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.errors import ConfigError
from convforge.layers.fuse import fold_batchnorm
from convforge.progress import progress_iter

ZETA, GAMMA = 1.1, -0.1
ITERATIONS = 1000
BATCH_SIZE = 32
PAPER_LR, PAPER_ITERATIONS = 1e-3, 10_000
REG_WEIGHT = 0.01
BETA = (20.0, 2.0)
WARMUP = 0.2
SCALE_SEARCH = torch.linspace(0.3, 1.0, 71)


def _levels(bits: int) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ConfigError(f"weight bits must be between 2 and 8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _per_channel(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def channel_scales(weight: torch.Tensor, bits: int, method: str = "mse") -> torch.Tensor:
    """Per-output-channel scales of the symmetric ``bits``-bit grid for ``weight`` (out x ...)."""
    qmin, qmax = _levels(bits)
    absmax = weight.detach().flatten(1).abs().amax(1).clamp_min(1e-12)
    if method == "minmax":
        return absmax / qmax
    if method != "mse":
        raise ConfigError(f"scale method must be 'mse' or 'minmax', got {method!r}")
    flat = weight.detach().flatten(1)
    best, best_err = absmax / qmax, torch.full_like(absmax, math.inf)
    for ratio in SCALE_SEARCH.tolist():
        scale = absmax * ratio / qmax
        err = (torch.clamp(torch.round(flat / scale[:, None]), qmin, qmax) * scale[:, None] - flat).pow(2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def round_to_grid(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` rounded to the nearest point of its per-channel grid (clamped to the grid's range)."""
    qmin, qmax = _levels(bits)
    s = _per_channel(scale, weight)
    return torch.clamp(torch.round(weight / s), qmin, qmax) * s


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and linear layers (the ones whose weights are put on a grid), in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def _execution_order(model: nn.Module, layers: list[tuple[str, nn.Module]], example: torch.Tensor) -> list:
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n)) for name, m in layers]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    by_name = dict(layers)
    seen = list(dict.fromkeys(order))
    return [(name, by_name[name]) for name in seen] + [(n, m) for n, m in layers if n not in seen]


def _bits_per_layer(names: Sequence[str], bits: int, first_last_bits: int | None) -> dict[str, int]:
    chosen = {name: bits for name in names}
    if first_last_bits is not None and names:
        chosen[names[0]] = chosen[names[-1]] = first_last_bits
    return chosen


def _prepare(model: nn.Module, example: torch.Tensor, bits: int, first_last_bits: int | None):
    _levels(bits)
    if first_last_bits is not None:
        _levels(first_last_bits)
    folded = fold_batchnorm(copy.deepcopy(model).float()).eval()
    layers = _execution_order(folded, quantizable_layers(folded), example)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no convolution or linear layer to quantize")
    return folded, layers, _bits_per_layer([n for n, _ in layers], bits, first_last_bits)


def _layer_entry(name: str, module: nn.Module, bits: int, scale: torch.Tensor, method: str) -> dict[str, Any]:
    return {"name": name, "bits": bits, "channels": int(scale.numel()), "weights": int(module.weight.numel()),
            "rounding": method, "scale": [float(s) for s in scale]}


def quantize_weights_nearest(model: nn.Module, bits: int = 4, *, first_last_bits: int | None = 8,
                             scale_method: str = "mse", example: torch.Tensor | None = None
                             ) -> tuple[nn.Module, dict[str, Any]]:
    """Round-to-nearest baseline: a BN-folded copy of ``model`` whose conv/linear weights are rounded to their
    per-channel ``bits``-bit grid. ``example`` (one input batch) fixes which layers are first and last; without it
    the registration order is used. Returns the model and a report (see :func:`storage`)."""
    folded = fold_batchnorm(copy.deepcopy(model).float()).eval()
    layers = quantizable_layers(folded)
    if example is not None:
        layers = _execution_order(folded, layers, example)
    chosen = _bits_per_layer([n for n, _ in layers], bits, first_last_bits)
    entries = []
    with torch.no_grad():
        for name, module in layers:
            scale = channel_scales(module.weight, chosen[name], scale_method)
            module.weight.copy_(round_to_grid(module.weight, scale, chosen[name]))
            entries.append(_layer_entry(name, module, chosen[name], scale, "nearest"))
    return folded, {"method": "nearest", "bits": bits, "first_last_bits": first_last_bits,
                    "scale_method": scale_method, "layers": entries, **storage(entries, folded)}


def storage(entries: Sequence[dict[str, Any]], model: nn.Module) -> dict[str, int]:
    """Bytes of the quantized weights packed at their bit width, of their float32 per-channel scales and float32
    biases, against the float32 weights and biases of the same layers."""
    modules = dict(model.named_modules())
    packed = sum(math.ceil(e["weights"] * e["bits"] / 8) for e in entries)
    scales = sum(4 * e["channels"] for e in entries)
    biases = sum(4 * modules[e["name"]].bias.numel() for e in entries if modules[e["name"]].bias is not None)
    fp32 = sum(4 * e["weights"] for e in entries) + biases
    return {"packed_weight_bytes": packed, "scale_bytes": scales, "bias_bytes": biases,
            "quantized_bytes": packed + scales + biases, "fp32_bytes": fp32}


def default_lr(iterations: int) -> float:
    """The paper's Adam learning rate (1e-3 over 10k iterations) scaled so that V can travel as far in fewer
    iterations (Adam's step is about lr): 1e-2 at the default 1,000."""
    return PAPER_LR * PAPER_ITERATIONS / max(iterations, 1)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _layer_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def reconstruction_error(module: nn.Module, weight: torch.Tensor, inputs: torch.Tensor,
                         targets: torch.Tensor) -> float:
    """Mean over images and positions of the squared output error summed over channels."""
    with torch.no_grad():
        return float((_layer_forward(module, inputs, weight) - targets).pow(2).sum(1).mean())


def adaround_layer(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, bits: int,
                   *, iterations: int = ITERATIONS, batch_size: int = BATCH_SIZE, lr: float | None = None,
                   reg_weight: float = REG_WEIGHT, generator: torch.Generator | None = None,
                   steps=None) -> tuple[torch.Tensor, dict[str, float]]:
    """AdaRound one layer: the grid weight (hard rounding of the learned h(V)) minimising the reconstruction of
    ``targets`` from ``inputs``, and statistics (the final share of h(V) within 0.01 of 0 or 1)."""
    qmin, qmax = _levels(bits)
    weight = module.weight.detach()
    s = _per_channel(scale, weight)
    floor = torch.floor(weight / s)
    rest = (weight / s - floor).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(V) = rest: the soft start is W itself
    optimizer = torch.optim.Adam([v], lr=default_lr(iterations) if lr is None else lr)
    generator = generator or torch.Generator().manual_seed(0)
    warm = int(WARMUP * iterations)
    for step in range(iterations):
        index = torch.randint(len(inputs), (min(batch_size, len(inputs)),), generator=generator)
        h = rectified_sigmoid(v)
        out = _layer_forward(module, inputs[index], s * torch.clamp(floor + h, qmin, qmax))
        loss = (out - targets[index]).pow(2).sum(1).mean()
        if step >= warm:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (step - warm) / max(iterations - warm, 1))
            loss = loss + reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if steps is not None:
            next(steps, None)
    with torch.no_grad():
        h = rectified_sigmoid(v)
        decided = float(((h < 0.01) | (h > 0.99)).float().mean())
        return s * torch.clamp(floor + (h >= 0.5).float(), qmin, qmax), {"h_decided": decided}


class _Captured(Exception):
    """Raised by a capture hook to stop the forward pass once the layer's input is kept."""


def layer_inputs(model: nn.Module, layer: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The input of ``layer`` inside ``model`` for each of ``images`` (the pass stops at the layer)."""
    kept: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        kept.append(args[0].detach())
        raise _Captured

    handle = layer.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                try:
                    model(images[start:start + batch_size])
                except _Captured:
                    pass
    finally:
        handle.remove()
    if len(kept) < math.ceil(len(images) / batch_size):
        raise ConfigError(f"layer {type(layer).__name__} did not run in the forward pass; it cannot be quantized "
                          "by reconstruction")
    return torch.cat(kept)


def adaround_quantize(model: nn.Module, calibration: torch.Tensor, bits: int = 4, *,
                      iterations: int = ITERATIONS, batch_size: int = BATCH_SIZE, lr: float | None = None,
                      reg_weight: float = REG_WEIGHT, first_last_bits: int | None = 8, scale_method: str = "mse",
                      seed: int = 0, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """AdaRound ``bits``-bit per-channel weights for a BN-folded copy of ``model``, layer by layer in execution
    order, on ``calibration`` (normalised images, N x C x H x W; a few hundred are enough).

    Returns the quantized model (every conv/linear weight on its grid; the scales are in the report) and a
    report: per layer its bits, scales, reconstruction error of round-to-nearest and of AdaRound on the
    calibration inputs, and the share of h(V) decided; storage as in :func:`storage`. Deterministic per seed."""
    if calibration is None or len(calibration) == 0:
        raise ConfigError("AdaRound needs calibration images (normalised, N x C x H x W): pass --calib-data SPEC, "
                          "or ZeroQ distilled images")
    calibration = calibration.float()
    reference, layers, chosen = _prepare(model, calibration[:1], bits, first_last_bits)
    reference.requires_grad_(False)
    quantized = copy.deepcopy(reference)
    by_name = dict(quantized.named_modules())
    generator = torch.Generator().manual_seed(seed)
    steps = progress_iter(iter(range(iterations * len(layers))), iterations * len(layers),
                          "AdaRound") if progress else None
    entries = []
    try:
        for name, float_layer in layers:
            layer = by_name[name]
            with torch.no_grad():
                targets = _layer_forward(float_layer, layer_inputs(reference, float_layer, calibration),
                                         float_layer.weight)
            inputs = layer_inputs(quantized, layer, calibration)
            scale = channel_scales(layer.weight, chosen[name], scale_method)
            nearest = round_to_grid(layer.weight.detach(), scale, chosen[name])
            rounded, stats = adaround_layer(layer, inputs, targets, scale, chosen[name], iterations=iterations,
                                            batch_size=batch_size, lr=lr, reg_weight=reg_weight,
                                            generator=generator, steps=steps)
            entry = _layer_entry(name, layer, chosen[name], scale, "adaround")
            entry.update(stats, error_nearest=reconstruction_error(layer, nearest, inputs, targets),
                         error_adaround=reconstruction_error(layer, rounded, inputs, targets))
            with torch.no_grad():
                layer.weight.copy_(rounded)
            entries.append(entry)
    finally:
        if steps is not None:
            steps.close()
    return quantized, {"method": "adaround", "bits": bits, "first_last_bits": first_last_bits,
                       "scale_method": scale_method, "iterations": iterations, "batch_size": batch_size,
                       "calibration_images": len(calibration), "seed": seed, "layers": entries,
                       **storage(entries, quantized)}


def grid_levels(model: nn.Module, report: dict[str, Any]) -> dict[str, int]:
    """Per layer of ``report``, the largest number of distinct grid integers used by one output channel, after
    checking that every weight is an integer multiple of its channel's scale within the grid's range."""
    modules = dict(model.named_modules())
    levels = {}
    for entry in report["layers"]:
        weight = modules[entry["name"]].weight.detach()
        scale = _per_channel(torch.tensor(entry["scale"], dtype=weight.dtype), weight)
        q = weight / scale
        qmin, qmax = _levels(entry["bits"])
        if not torch.allclose(q, torch.round(q), atol=1e-3) or q.min() < qmin - 1e-3 or q.max() > qmax + 1e-3:
            raise ConfigError(f"layer {entry['name']}: weights are not on their {entry['bits']}-bit grid")
        levels[entry["name"]] = max(len(torch.unique(torch.round(row))) for row in q.flatten(1))
    return levels
