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


class Lookahead(ModelEma):
    """airbench94's Lookahead: every ``every`` steps the slow copy moves toward the weights,
    ``slow = decay_t * slow + (1 - decay_t) * weights`` with ``decay_t = 0.95**5 * (t / total_steps)**3``, and the
    weights are set to the slow copy; after the last step the weights are the slow copy. Floating-point
    buffers (BatchNorm statistics) are averaged the same way, as airbench averages the whole state dict.

    Early in training ``decay_t`` is near 0 (the slow copy follows the weights); near the end it approaches
    0.77 per sync, averaging the last few hundred steps.
    """

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5) -> None:
        super().__init__(model, decay=0.95 ** 5)
        self.total_steps, self.every = max(1, total_steps), every

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        t = int(self.updates)
        if t >= self.total_steps:
            self._sync(model, decay=1.0)
        elif t % self.every == 0:
            self._sync(model, decay=self.decay * (t / self.total_steps) ** 3)

    def _sync(self, model: nn.Module, decay: float) -> None:
        slow = [*self.module.parameters(), *self.module.buffers()]
        fast = [*model.parameters(), *model.buffers()]
        for s, f in zip(slow, fast):
            if s.dtype.is_floating_point:
                s.lerp_(f.detach(), 1.0 - decay)
                f.copy_(s)
