"""Recording and re-applying the layer widths of a structurally pruned model.

A pruned checkpoint's metadata holds ``pruned = {"shapes": {tensor name: shape}, ...}`` for every
parameter and buffer whose shape differs from the unpruned model. ``load_checkpoint`` builds the
model from its registry name and arguments as usual, then calls :func:`apply_widths`, which resizes
those tensors and the attributes of the modules that own them (``in_channels``, ``groups``,
``num_features``, ``normalized_shape``, ...), so that the saved weights load without restating anything.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from convforge.errors import CheckpointError


def is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def sync_module_attrs(module: nn.Module, depthwise: bool = False) -> None:
    """Set a module's size attributes from the shapes of its (resized) tensors."""
    if isinstance(module, nn.Conv2d):
        if depthwise:
            module.groups = module.in_channels = module.out_channels = module.weight.shape[0]
            return
        if module.groups > 1:  # pruned whole groups at a time: the group width (outputs per group) stays
            module.groups = module.weight.shape[0] // (module.out_channels // module.groups)
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = module.running_mean if module.running_mean is not None else module.weight
        if ref is not None:
            module.num_features = ref.shape[0]
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.normalized_shape = (module.weight.shape[0],)


def changed_shapes(model: nn.Module, reference: nn.Module) -> dict[str, list[int]]:
    """Names and shapes of the tensors of ``model`` whose shape differs from ``reference``."""
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    return {k: list(v.shape) for k, v in model.state_dict().items() if ref.get(k) != tuple(v.shape)}


def apply_widths(model: nn.Module, pruned: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Resize the tensors named in ``pruned["shapes"]`` (and their modules' attributes) in place."""
    shapes = pruned.get("shapes") if isinstance(pruned, dict) else None
    if not isinstance(shapes, dict):
        raise CheckpointError(f"{source}: 'pruned.shapes' must map tensor names to shapes, got {type(shapes).__name__}")
    owners: dict[str, bool] = {}
    depthwise = {name: is_depthwise(m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, shape in shapes.items():
        if not isinstance(name, str) or not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 1 << 24 for s in shape):
            raise CheckpointError(f"{source}: 'pruned.shapes' entry {name!r}: {shape!r} is not a list of sizes")
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            raise CheckpointError(f"{source}: pruned tensor {name!r} names no module of the model") from None
        if attr in owner._parameters and owner._parameters[attr] is not None:
            old = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(torch.zeros(shape, dtype=old.dtype), requires_grad=old.requires_grad)
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            old = owner._buffers[attr]
            owner._buffers[attr] = torch.zeros(shape, dtype=old.dtype)
        else:
            raise CheckpointError(f"{source}: pruned tensor {name!r} is not a parameter or buffer of the model")
        owners[owner_name] = depthwise.get(owner_name, False)
    for owner_name, dw in owners.items():
        sync_module_attrs(model.get_submodule(owner_name) if owner_name else model, dw)
    if isinstance(pruned.get("num_features"), int) and hasattr(model, "num_features"):
        model.num_features = pruned["num_features"]
    return model
