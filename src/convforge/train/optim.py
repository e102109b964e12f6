"""Optimizers (SGD with Nesterov, AdamW) with no decay on norm and bias parameters, and LR schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from convforge.config import TrainConfig


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_lr_scale: float = 1.0,
                 decay_all: bool = False) -> list[dict]:
    """Parameter groups: conv and linear weights decay; biases and norm parameters do not (``decay_all``: they
    do too, as in airbench94). ``norm_lr_scale`` multiplies the learning rate of normalisation layers'
    parameters and divides their weight decay, so the decay per step (lr x wd) is unchanged (airbench94's
    ``bias_scaler``). Each group's ``lr_scale`` is applied by the training step."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, no_decay, norm = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in norm_ids and norm_lr_scale != 1.0:
            norm.append(param)
        else:
            (no_decay if param.ndim <= 1 and not decay_all else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if norm:
        norm_decay = weight_decay / norm_lr_scale if decay_all else 0.0
        groups.append({"params": norm, "weight_decay": norm_decay, "lr_scale": norm_lr_scale})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay or 0.0, cfg.norm_lr_scale, cfg.decay_all)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    - ``onecycle``: linear warm-up from peak/25 to peak, then cosine annealing to peak/1e4;
    - ``cosine``: linear warm-up from 0 to peak, then cosine annealing to 0;
    - ``constant``: linear warm-up, then ``peak``;
    - ``step``: linear warm-up, then ``peak`` divided by 10 at 50% and again at 75% of the steps
      (He et al. 2016's CIFAR schedule: 32k and 48k of 64k iterations);
    - ``triangle``: linear from 0.2 x peak to peak over the warm-up, then linear to 0.07 x peak at the end
      (airbench94's schedule, with 23% of the steps as warm-up there).
    """
    total_steps = max(total_steps, 1)
    if schedule == "triangle":
        if step < warmup_steps:
            return peak * (0.2 + 0.8 * step / warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return peak * (1.0 - 0.93 * progress)
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
