"""Parameters and MACs of a model, measured rather than looked up."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass at ``input_size`` (C, H, W), per image.

    Counted by ``torch.utils.flop_counter`` (convolutions, matrix products, attention), which
    reports 2 FLOPs per MAC; element-wise operations (BatchNorm, activations) are not counted,
    as in the papers' MAC figures.
    """
    return macs_by_module(model, input_size, batch_size).get("Global", 0)


def macs_by_module(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> dict[str, int]:
    """MACs per image of every module that does any, from one counted forward pass (as ``count_macs``).

    Keys are flop_counter's module names (``ClassName.child.grandchild``); ``"Global"`` is the total.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((batch_size, *input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {name: sum(counts.values()) // (2 * batch_size) for name, counts in counter.get_flop_counts().items()}
