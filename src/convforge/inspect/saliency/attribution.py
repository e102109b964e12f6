"""Integrated gradients (Sundararajan et al. 2017) and occlusion (Zeiler & Fergus 2014), both through captum."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from convforge.errors import ConfigError
from convforge.inspect.saliency.hooks import Target, as_batch, predicted, prepared


def baseline_for(x: torch.Tensor, baseline: str | float | torch.Tensor = "mean",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor | float:
    """An IG / occlusion baseline for normalised images: ``"mean"`` (0 after normalisation: the data's mean
    colour), ``"black"`` (needs the normalisation ``mean`` and ``std``), a number or a tensor."""
    if isinstance(baseline, str):
        if baseline == "mean":
            return 0.0
        if baseline == "black":
            if mean is None or std is None:
                raise ConfigError("a black baseline needs the normalisation: pass mean=... and std=...")
            values = [-m / s for m, s in zip(mean, std)]
            if len(values) != x.shape[1]:
                raise ConfigError(f"mean/std give {len(values)} channels, the images have {x.shape[1]}")
            return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1).expand_as(x).contiguous()
        raise ConfigError(f"baseline must be 'mean', 'black', a number or a tensor, got {baseline!r}")
    return baseline


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target = None, *, layer: str | None = None,
                         baseline: str | float | torch.Tensor = "mean", n_steps: int = 50,
                         internal_batch_size: int | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, return_delta: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients summed over channels (N, H, W) (``layer`` is unused); with ``return_delta``, also
    captum's convergence delta per image (attributions' sum minus ``f(x) - f(baseline)``)."""
    from captum.attr import IntegratedGradients

    x = as_batch(x)
    chosen = predicted(model, x, target)
    with prepared(model), torch.enable_grad():
        attributions, delta = IntegratedGradients(model).attribute(
            x, baselines=baseline_for(x, baseline, mean, std), target=chosen, n_steps=n_steps,
            internal_batch_size=internal_batch_size, return_convergence_delta=True)
    maps = attributions.detach().sum(1)
    return (maps, delta.detach()) if return_delta else maps


def occlusion(model: nn.Module, x: torch.Tensor, target: Target = None, *, layer: str | None = None,
              window: int | None = None, stride: int | None = None, baseline: str | float | torch.Tensor = "mean",
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              perturbations_per_eval: int = 64) -> torch.Tensor:
    """Occlusion maps (N, H, W): the drop of the target logit when a ``window`` x ``window`` patch (default:
    1/8 of the shorter side) is set to the baseline, averaged over the windows covering each pixel
    (``stride`` default: half the window; ``layer`` is unused)."""
    from captum.attr import Occlusion

    x = as_batch(x)
    channels, height, width = x.shape[1:]
    window = window or max(1, round(min(height, width) / 8))
    stride = stride or max(1, window // 2)
    if not (0 < window <= min(height, width) and 0 < stride):
        raise ConfigError(f"occlusion window must be in 1..{min(height, width)} and stride >= 1, "
                          f"got window={window} stride={stride}")
    chosen = predicted(model, x, target)
    with prepared(model), torch.no_grad():
        attributions = Occlusion(model).attribute(
            x, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride),
            baselines=baseline_for(x, baseline, mean, std), target=chosen,
            perturbations_per_eval=perturbations_per_eval)
    return attributions.detach().mean(1)
