"""FullGrad (Srinivas & Fleuret 2019): the input-gradient and bias-gradient decomposition of a logit, and the
saliency map built from it.

Our own code rather than pytorch-grad-cam's FullGrad, which needs torchvision and returns only the
post-processed map, so that the completeness of the decomposition cannot be checked.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from convforge.errors import ConfigError
from convforge.inspect.saliency.hooks import (
    Target,
    as_batch,
    class_logits,
    prepared,
    recording,
    resolve_target,
    target_score,
)


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a layer adds per output channel: a conv's or linear layer's own, or an eval-mode batch norm's
    implicit ``beta - gamma * running_mean / sqrt(running_var + eps)``; None for other modules."""
    if isinstance(module, (_ConvNd, nn.Linear)):
        return module.bias
    if isinstance(module, _BatchNorm):
        if module.running_mean is None or module.running_var is None:
            raise ConfigError("FullGrad needs batch norms with running statistics (track_running_stats=True)")
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = module.weight * scale
        shift = -module.running_mean * scale
        return shift + module.bias if module.bias is not None else shift
    return None


def _bias_map(module: nn.Module, bias: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear) or output.ndim == 2:  # a linear layer adds along the last dimension
        return bias.to(output.dtype)
    return bias.to(output.dtype).view(1, -1, *([1] * (output.ndim - 2)))


def decompose(model: nn.Module, x: torch.Tensor, target: Target = None
              ) -> tuple[torch.Tensor, list[tuple[str, bool, torch.Tensor]]]:
    """The input gradient (N, C, H, W) and, per call of each biased layer, ``(name, spatial, gradient x bias)``
    where ``spatial`` says whether the map is (N, C, h, w) channels-first (a conv or batch norm)."""
    x = as_batch(x)
    biased = {name: module for name, module in model.named_modules() if layer_bias(module) is not None}
    with prepared(model), recording(list(biased.items())) as records, torch.enable_grad():
        x = x.clone().requires_grad_(True)
        logits = class_logits(model, x)
        chosen = resolve_target(logits, target)
        outputs = [(name, out) for name, out in records if isinstance(out, torch.Tensor) and out.requires_grad]
        grads = torch.autograd.grad(target_score(logits, chosen), [x] + [out for _, out in outputs],
                                    allow_unused=True)
        terms = []
        for (name, out), grad in zip(outputs, grads[1:]):
            if grad is None:  # a layer whose output does not reach the logits
                continue
            module = biased[name]
            bias = _bias_map(module, layer_bias(module), out).detach()  # type: ignore[arg-type]
            spatial = out.ndim == 4 and not isinstance(module, nn.Linear)
            terms.append((name, spatial, (grad * bias).detach()))
    return grads[0].detach(), terms


def fullgrad_decomposition(model: nn.Module, x: torch.Tensor, target: Target = None
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """FullGrad's decomposition of each image's target logit (default: the predicted class): the input gradient
    and one gradient x bias map per call of every Conv/Linear bias and batch norm (implicit bias).

    For a piecewise-linear network (ReLU, max-pooling, eval-mode batch norm) the logit is exactly
    ``(input_grad * x).sum() + sum(term.sum() for term in bias_terms)`` per image.
    """
    input_grad, terms = decompose(model, x, target)
    return input_grad, [term for _, _, term in terms]


def _post_process(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FullGrad's psi: absolute value, rescaled to [0, 1] per image over all channels and positions."""
    maps = maps.abs()
    flat = maps.flatten(1)
    low = flat.min(1).values.view(-1, *([1] * (maps.ndim - 1)))
    maps = maps - low
    high = maps.flatten(1).max(1).values.view(-1, *([1] * (maps.ndim - 1)))
    return maps / (high + eps)


def fullgrad(model: nn.Module, x: torch.Tensor, target: Target = None, *, layer: str | None = None,
             **opts: Any) -> torch.Tensor:
    """FullGrad maps (N, H, W): psi(input_grad * x) plus psi(gradient x bias) of every spatial bias map, each
    upsampled bilinearly and summed over channels (``layer`` is unused: FullGrad takes every layer)."""
    if opts:
        raise ConfigError(f"fullgrad takes no options, got {', '.join(sorted(opts))}")
    x = as_batch(x)
    input_grad, terms = decompose(model, x, target)
    size = x.shape[-2:]
    saliency = _post_process(input_grad * x).sum(1)
    for _, spatial, term in terms:
        if spatial:
            saliency = saliency + F.interpolate(_post_process(term), size=size, mode="bilinear",
                                                align_corners=False).sum(1)
    return saliency
