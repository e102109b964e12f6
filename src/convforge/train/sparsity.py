"""Conv/linear weights that pruning and ``--keep-sparsity`` work on, and holding chosen weights at zero."""

from __future__ import annotations

import torch
import torch.nn as nn


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every convolution and linear weight of ``model`` as ``(parameter name, parameter)``."""
    return [(f"{name}.weight", m.weight) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(getattr(m, "weight", None), nn.Parameter)]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Multiply each named parameter by its mask (False/0 sets the weight to zero), in place."""
    for name, mask in masks.items():
        model.get_parameter(name).mul_(mask.to(model.get_parameter(name).dtype))
