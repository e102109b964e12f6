"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018) through one hook mechanism.

Our own code rather than pytorch-grad-cam, which needs torchvision; captum has no Grad-CAM++.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.errors import ConfigError
from convforge.inspect.saliency.hooks import (
    Target,
    as_batch,
    class_logits,
    default_layer,
    feature_layers,
    find_layer,
    prepared,
    recording,
    resolve_target,
    target_score,
)

Weigh = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def activations_and_gradients(model: nn.Module, x: torch.Tensor, target: Target, layer: str | None
                              ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The feature map A (N, K, h, w) of ``layer`` (default: :func:`default_layer`; a module called several
    times: its last call), the gradient of each image's target logit with respect to it, and the layer name."""
    x = as_batch(x)
    name = layer or default_layer(model, x)
    module = find_layer(model, name, x)
    with prepared(model), recording([(name, module)]) as records, torch.enable_grad():
        # the input requires grad so that the graph exists even when the parameters are frozen
        logits = class_logits(model, x.clone().requires_grad_(True))
        chosen = resolve_target(logits, target)
        if not records or not isinstance(records[-1][1], torch.Tensor) or records[-1][1].ndim != 4:
            raise ConfigError(f"layer {name!r} does not output a 4-D feature map; candidates: "
                              f"{', '.join(feature_layers(model, x)[-40:])}")
        acts = records[-1][1]
        (grads,) = torch.autograd.grad(target_score(logits, chosen), acts, allow_unused=True)
    if grads is None:
        raise ConfigError(f"layer {name!r} does not reach the model's output")
    return acts.detach(), grads.detach(), name


def class_activation_map(model: nn.Module, x: torch.Tensor, target: Target, layer: str | None,
                         weigh: Weigh) -> torch.Tensor:
    """ReLU(sum_k w_k A_k) with channel weights ``weigh(A, dY/dA)`` (N, K), upsampled bilinearly to the input."""
    acts, grads, _ = activations_and_gradients(model, x, target, layer)
    weights = weigh(acts, grads)
    cam = F.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True))
    size = as_batch(x).shape[-2:]
    if cam.shape[-2:] != size:
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam[:, 0]


def gradcam_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: the spatial mean of the gradient per channel."""
    return grads.mean(dim=(2, 3))


def gradcam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++: sum_ij a_ij ReLU(g_ij), a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3) (the closed form for an
    exponential of the score, written with the logit's gradient g as in the paper's code)."""
    g2, g3 = grads.pow(2), grads.pow(3)
    total = acts.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * g2 + total * g3
    alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
    return (alpha * F.relu(grads)).sum(dim=(2, 3))


def gradcam(model: nn.Module, x: torch.Tensor, target: Target = None, *, layer: str | None = None,
            **opts: Any) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) of normalised images ``x`` for ``target`` (default: the predicted class)."""
    _no_options("gradcam", opts)
    return class_activation_map(model, x, target, layer, gradcam_weights)


def gradcam_pp(model: nn.Module, x: torch.Tensor, target: Target = None, *, layer: str | None = None,
               **opts: Any) -> torch.Tensor:
    """Grad-CAM++ maps (N, H, W) of normalised images ``x`` for ``target`` (default: the predicted class)."""
    _no_options("gradcam++", opts)
    return class_activation_map(model, x, target, layer, gradcam_pp_weights)


def _no_options(method: str, opts: dict[str, Any]) -> None:
    if opts:
        raise ConfigError(f"{method} takes no options, got {', '.join(sorted(opts))}")
