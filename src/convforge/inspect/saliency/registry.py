"""The saliency methods by name, and :func:`explain`, which runs one of them."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from convforge.errors import ConfigError
from convforge.inspect.saliency.attribution import integrated_gradients, occlusion
from convforge.inspect.saliency.cams import gradcam, gradcam_pp
from convforge.inspect.saliency.decomposition import fullgrad
from convforge.inspect.saliency.hooks import Target, as_batch

# name -> fn(model, x, target=None, *, layer=None, **opts) -> (N, H, W) maps
METHODS: dict[str, Callable[..., Any]] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_pp,
    "fullgrad": fullgrad,
    "ig": integrated_gradients,
    "occlusion": occlusion,
}
ALIASES = {"integrated_gradients": "ig", "integrated-gradients": "ig", "grad-cam": "gradcam",
           "gradcampp": "gradcam++", "grad-cam++": "gradcam++"}
# methods whose maps come from one feature layer (the others ignore ``layer``)
LAYER_METHODS = ("gradcam", "gradcam++")


def method_name(name: str) -> str:
    """The registry name of a method or alias (case-insensitive); a ConfigError listing the valid ones."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ConfigError(f"unknown saliency method {name!r}; valid methods: {', '.join(METHODS)} (or all)")
    return key


def parse_methods(spec: str) -> list[str]:
    """A comma-separated list of methods, or ``all``, as registry names without repeats."""
    parts = [part for part in spec.split(",") if part.strip()]
    if not parts:
        raise ConfigError(f"no saliency method given; valid methods: {', '.join(METHODS)} (or all)")
    if any(part.strip().lower() == "all" for part in parts):
        return list(METHODS)
    return list(dict.fromkeys(method_name(part) for part in parts))


def explain(model: nn.Module, images: torch.Tensor, method: str, *, target: Target = None,
            layer: str | None = None, **opts: Any) -> torch.Tensor:
    """Saliency maps (N, H, W) of ``images`` (N, C, H, W), already normalised as ``model`` expects.

    ``target``: a class, or one per image (default: the predicted class); ``layer``: the dotted module name a
    Grad-CAM is taken at (default: the last feature map before global pooling); ``opts``: the method's own
    (ig: baseline, n_steps, internal_batch_size, mean, std; occlusion: window, stride, baseline).
    The model's training modes, in-place flags and hooks are left as they were.
    """
    function = METHODS[method_name(method)]
    return function(model, as_batch(images), target, layer=layer, **opts).detach()
