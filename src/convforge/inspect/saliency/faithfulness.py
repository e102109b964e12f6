"""Checks that saliency maps say something about the model: deletion / insertion curves (Petsiuk et al. 2018,
RISE) and the cascading model-randomisation test (Adebayo et al. 2018, Sanity Checks for Saliency Maps)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.errors import ConfigError
from convforge.inspect.saliency.hooks import Target, as_batch, class_logits, predicted, prepared
from convforge.inspect.saliency.registry import explain


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (N, C, H, W) blurred by a separable Gaussian of ``sigma`` pixels (edges replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _curves(model: nn.Module, start: torch.Tensor, end: torch.Tensor, ranks: torch.Tensor, target: torch.Tensor,
            steps: int, batch_size: int) -> torch.Tensor:
    """Target probability (N, steps + 1) as the top-ranked pixels move from ``start`` to ``end``."""
    n, _, height, width = start.shape
    pixels = height * width
    counts = [round(pixels * k / steps) for k in range(steps + 1)]
    curves = torch.empty(n, steps + 1)
    with torch.no_grad(), prepared(model):
        for i in range(n):
            masks = torch.stack([ranks[i] < c for c in counts]).view(steps + 1, 1, height, width)
            views = torch.where(masks, end[i:i + 1], start[i:i + 1])
            probs = torch.cat([class_logits(model, views[j:j + batch_size]).float().softmax(1)
                               for j in range(0, steps + 1, batch_size)])
            curves[i] = probs[:, int(target[i])].cpu()
    return curves


def deletion_insertion(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: Target = None, *,
                       steps: int = 32, baseline: float | str | torch.Tensor = 0.0, blur_sigma: float | None = None,
                       batch_size: int = 256) -> dict[str, Any]:
    """Deletion and insertion curves of the target class's probability (default: the predicted class).

    Deletion: the most salient pixels first are set to ``baseline`` (0: the mean colour of normalised images;
    ``"blur"``: the blurred image's pixels, which removes detail without adding new edges); insertion: they
    are copied in, in the same order, into the blurred image (``blur_sigma``, default 1/8 of the shorter side).
    Returns per-image ``deletion`` and ``insertion`` areas under the curves (x from 0 to 1) and the
    ``deletion_curve`` / ``insertion_curve`` (N, steps + 1). Lower deletion and higher insertion areas mean a
    more faithful map.
    """
    x = as_batch(x)
    maps = maps.detach().to(x.device)
    if maps.shape != (x.shape[0], *x.shape[2:]):
        raise ConfigError(f"maps must be (N, H, W) = {(x.shape[0], *x.shape[2:])}, got {tuple(maps.shape)}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    chosen = predicted(model, x, target)
    order = maps.flatten(1).float().argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=x.device).expand_as(order))
    blurred = gaussian_blur(x, blur_sigma or max(1.0, min(x.shape[-2:]) / 8))
    if isinstance(baseline, str) and baseline != "blur":
        raise ConfigError(f"baseline must be a number, a tensor or 'blur', got {baseline!r}")
    removed = blurred if isinstance(baseline, str) else torch.as_tensor(baseline, dtype=x.dtype,
                                                                         device=x.device).expand_as(x)
    deletion = _curves(model, x, removed, ranks, chosen, steps, batch_size)
    insertion = _curves(model, blurred, x, ranks, chosen, steps, batch_size)

    def area(curve: torch.Tensor) -> torch.Tensor:
        return (curve[:, 1:] + curve[:, :-1]).sum(1) / (2 * steps)

    return {"deletion": area(deletion), "insertion": area(insertion), "deletion_curve": deletion,
            "insertion_curve": insertion}


def parameterised_layers(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own, in definition order (input to output)."""
    return [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]


def randomise_top_layers(model: nn.Module, layers_from_top: int, seed: int = 0) -> list[str]:
    """Re-initialise (``reset_parameters``; batch norms also lose their running statistics) the last
    ``layers_from_top`` parameterised layers of ``model`` in place; their names, top first."""
    names = parameterised_layers(model)
    if not 1 <= layers_from_top <= len(names):
        raise ConfigError(f"layers_from_top must be in 1..{len(names)}, got {layers_from_top}")
    modules = dict(model.named_modules())
    chosen = names[::-1][:layers_from_top]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in chosen:
            if not hasattr(modules[name], "reset_parameters"):
                raise ConfigError(f"layer {name!r} ({type(modules[name]).__name__}) cannot be re-initialised")
            modules[name].reset_parameters()
    return chosen


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps; 0 when either is constant (it ranks nothing)."""
    from scipy.stats import spearmanr

    first, second = a.detach().double().flatten().cpu().numpy(), b.detach().double().flatten().cpu().numpy()
    if first.min() == first.max() or second.min() == second.max():
        return 0.0
    return float(spearmanr(first, second).statistic)


def randomisation_check(model: nn.Module, x: torch.Tensor, method: str, *, layers_from_top: int = 1,
                        target: Target = None, seed: int = 0, absolute: bool = False, **opts: Any) -> torch.Tensor:
    """Cascading model randomisation: the Spearman rank correlation (N,) between each image's map from
    ``model`` and from a deep copy whose top ``layers_from_top`` parameterised layers are re-initialised,
    both for the trained model's target (default: its predicted class). A map that depends on the learned
    weights decorrelates; ``absolute`` compares absolute values (as Adebayo et al. also report)."""
    x = as_batch(x)
    chosen = predicted(model, x, target)
    randomised = copy.deepcopy(model)
    randomise_top_layers(randomised, layers_from_top, seed)
    trained = explain(model, x, method, target=chosen, **opts)
    other = explain(randomised, x, method, target=chosen, **opts)
    if absolute:
        trained, other = trained.abs(), other.abs()
    return torch.tensor([spearman(a, b) for a, b in zip(trained, other)])
