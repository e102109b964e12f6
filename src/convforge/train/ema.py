"""Exponential moving average of model weights, with warm-up."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma(nn.Module):
    """Keeps ``ema = decay_t * ema + (1 - decay_t) * model`` with ``decay_t = min(decay, (1 + t) / (10 + t))``.

    The warm-up term lets the average follow the fast early changes; buffers (BatchNorm
    statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        t = float(self.updates)
        decay = min(self.decay, (1.0 + t) / (10.0 + t))
        ema_params = [p for p in self.module.parameters()]
        model_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
