"""Optimizers (SGD with Nesterov, AdamW) with no decay on norm and bias parameters, and LR schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from convforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of convs and linears decay; biases and norm parameters (ndim <= 1) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay or 0.0)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    - ``onecycle``: linear warm-up from peak/25 to peak, then cosine annealing to peak/1e4;
    - ``cosine``: linear warm-up from 0 to peak, then cosine annealing to 0;
    - ``constant``: linear warm-up, then ``peak``;
    - ``step``: linear warm-up, then ``peak`` divided by 10 at 50% and again at 75% of the steps
      (He et al. 2016's CIFAR schedule: 32k and 48k of 64k iterations).
    """
    total_steps = max(total_steps, 1)
    if schedule == "onecycle":
        start, end = peak / 25.0, peak / 1e4
    else:
        start, end = 0.0, 0.0
    if step < warmup_steps:
        return start + (peak - start) * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    if schedule == "step":
        return peak * (0.1 ** sum(step >= fraction * total_steps for fraction in (0.5, 0.75)))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
