"""What the saliency methods share: a prepared model (eval mode, no in-place activations), forward hooks that
record every call of a module, the target class, and the feature layer a class activation map is taken at."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from convforge.errors import ConfigError

Target = int | Sequence[int] | torch.Tensor | None


@contextmanager
def prepared(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with every ``inplace=True`` module switched to ``inplace=False``; both restored.

    An in-place activation overwrites the recorded output of the layer before it, so its gradient and
    values (Grad-CAM's activations, FullGrad's bias maps) would be those of the activation instead.
    """
    modes = {module: module.training for module in model.modules()}
    switched = [module for module in model.modules() if getattr(module, "inplace", None) is True]
    for module in switched:
        module.inplace = False  # type: ignore[assignment]
    model.eval()
    try:
        yield model
    finally:
        for module in switched:
            module.inplace = True  # type: ignore[assignment]
        for module, training in modes.items():
            module.training = training


@contextmanager
def recording(modules: Sequence[tuple[str, nn.Module]], protect: bool = True) -> Iterator[list[tuple[str, Any]]]:
    """Record ``(name, output)`` of every call of each module, in call order (a module called twice, such as a
    ReLU reused within a block, is recorded twice); the hooks are removed on exit.

    ``protect``: pass a clone downstream, so that a functional in-place op (``F.relu(x, inplace=True)``, which
    no module flag can switch off) cannot overwrite the recorded tensor.
    """
    records: list[tuple[str, Any]] = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            records.append((name, output))
            if protect and isinstance(output, torch.Tensor):
                return output.clone()
            return None

        return hook

    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(hook_for(name)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def as_batch(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images, a single (C, H, W) image given a batch dimension."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ConfigError(f"images must be (N, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    return images.detach()


def class_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, checked to be (N, classes) logits."""
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"saliency maps need a classifier returning (N, classes) logits, got {shape}")
    return logits


def resolve_target(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """The class per image as a (N,) long tensor: ``target`` (one class or one per image), else the predicted."""
    n, classes = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    chosen = torch.as_tensor(target, dtype=torch.long, device=logits.device).flatten()
    if chosen.numel() == 1:
        chosen = chosen.expand(n)
    if chosen.numel() != n:
        raise ConfigError(f"target must be one class or one per image ({n}), got {chosen.numel()}")
    if bool(((chosen < 0) | (chosen >= classes)).any()):
        raise ConfigError(f"target classes must be in 0..{classes - 1}, got {chosen.tolist()}")
    return chosen.clone()


def predicted(model: nn.Module, x: torch.Tensor, target: Target = None) -> torch.Tensor:
    """``target`` resolved against the model's logits of ``x`` (one no-grad forward pass when it is None)."""
    with torch.no_grad(), prepared(model):
        return resolve_target(class_logits(model, x), target)


def target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum over images of each image's target logit (images are independent in eval mode)."""
    return logits.gather(1, target[:, None]).sum()


def feature_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the modules that output a 4-D feature map, in the order their calls end (one forward pass)."""
    return [name for name, _ in _feature_maps(model, x)]


def _feature_maps(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    modules = [(name, module) for name, module in model.named_modules() if name]
    with torch.no_grad(), prepared(model), recording(modules, protect=False) as records:
        class_logits(model, x[:1])
    seen: dict[str, torch.Tensor] = {}
    for name, output in records:  # a module called several times: its last call
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            seen.pop(name, None)
            seen[name] = output
    return list(seen.items())


def default_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The last feature map before global pooling: the module whose 4-D output (larger than 1x1) is produced
    last; of the modules that returned that same tensor (a block and its last child), the innermost one."""
    maps = _feature_maps(model, x)
    spatial = [(name, out) for name, out in maps if out.shape[-2] * out.shape[-1] > 1] or maps
    if not spatial:
        raise ConfigError("the model has no module that outputs a 4-D feature map: give --layer NAME")
    last = spatial[-1][1]
    return next(name for name, out in spatial if out is last)


def find_layer(model: nn.Module, name: str, x: torch.Tensor) -> nn.Module:
    """The module called ``name`` (dotted, as in ``model.named_modules()``); a ConfigError listing the feature
    layers when there is none."""
    module = dict(model.named_modules()).get(name) if name else None
    if module is None:
        candidates = feature_layers(model, x)
        shown = ", ".join(candidates[-40:]) + (f" (and {len(candidates) - 40} earlier)" if len(candidates) > 40 else "")
        raise ConfigError(f"no layer {name!r} in the model; layers with a 4-D feature map: {shown}")
    return module
