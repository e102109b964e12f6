"""Sparsity-inducing group regularisation before pruning: DepGraph's "Group" method (Fang et al., CVPR 2023).

Before every optimizer step, each prunable channel k of a dependency group gets an extra gradient

    reg * gamma_k * w        on every coupled slice of k (output filters of the producers, input slices
                             of the consumers, BatchNorm / LayerNorm scales),
    gamma_k = 2 ** (alpha * (I_max - I_k) / (I_max - I_min)),

where I_k is the group importance of k (the square root of the mean over the coupled slices of their
squared norms, see :mod:`convforge.compress.importance`) and I_max / I_min are taken over k's group. That
is the gradient of (reg / 2) * sum_k gamma_k * ||w_k||^2: the least important channel of a group is pulled
towards zero 2 ** alpha times harder than the most important one, so that pruning it later costs little.
This is the form of the paper (eq. 5) and of Torch-Pruning's ``GroupNormPruner.regularize`` (scale range
[1, 2 ** alpha] with alpha = 4); an older Torch-Pruning release used the group-lasso gradient
w / ||w_group|| instead. Groups whose channels all have the same importance are left alone (as there).

It runs as a training callback (:class:`convforge.train.callbacks.Callback`), so the regularised phase is an
ordinary run of the training engine (resumable, logged, DDP-safe: every rank adds the same term).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from convforge.compress.graph import build_graph
from convforge.compress.importance import coupled_slices
from convforge.errors import ConfigError
from convforge.train.callbacks import Callback


class GroupRegularizer(Callback):
    """Adds DepGraph's group regularisation gradient before each optimizer step of a training run.

    The dependency groups are found on ``model`` (traced at ``input_size``); the callback then acts on the
    run's model, matched by parameter name (the run's model is built from the same checkpoint).
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, ...], reg: float, alpha: float = 4.0) -> None:
        if not reg > 0:
            raise ConfigError(f"--sparsity-reg must be > 0, got {reg}")
        if not alpha >= 0:
            raise ConfigError(f"--sparsity-alpha must be >= 0, got {alpha}")
        g = build_graph(model, tuple(input_size))
        groups = g.dependency_groups()
        group_of = {root: j for j, group in enumerate(groups) for root in group}
        self.reg, self.alpha, self.groups = float(reg), float(alpha), len(groups)
        # per slice: (parameter name, dim, dense index of each position's root, or -1 when not prunable)
        roots = sorted(group_of)
        dense = {root: n for n, root in enumerate(roots)}
        self.slices = [(name, dim, torch.tensor([dense.get(g.uf.find(i), -1) for i in ids]))
                       for name, dim, ids in coupled_slices(g)]
        self.slices = [s for s in self.slices if bool((s[2] >= 0).any())]
        self.group_index = torch.tensor([group_of[root] for root in roots], dtype=torch.long)
        self.count = torch.zeros(len(roots))
        for _, _, index in self.slices:
            self.count[index[index >= 0].unique()] += 1
        self._params: dict[str, nn.Parameter] = {}
        self._handle: Any = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Regularise ``model``'s parameters before every ``optimizer.step()``."""
        params = dict(model.named_parameters())
        missing = [name for name, _, _ in self.slices if name not in params]
        if missing:
            raise ConfigError(f"the trained model has no parameter {missing[0]!r}: the group regulariser was "
                              f"built for another architecture")
        self._params = {name: params[name] for name, _, _ in self.slices}
        device = params[self.slices[0][0]].device if self.slices else torch.device("cpu")
        self.slices = [(name, dim, index.to(device)) for name, dim, index in self.slices]
        self.group_index, self.count = self.group_index.to(device), self.count.to(device)
        self._handle = optimizer.register_step_pre_hook(lambda *_: self.apply())

    def on_start(self, state: Any) -> None:
        self.attach(state.model, state.optimizer)

    def close(self, state: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def scales(self) -> torch.Tensor:
        """gamma of every prunable channel (dense index) for the current weights; 0 in uniform groups."""
        device = self.count.device
        total = torch.zeros(len(self.count), dtype=torch.float64, device=device)
        for name, dim, index in self.slices:
            squares = self._params[name].detach().double().square()
            sums = squares if squares.dim() == 1 else squares.transpose(0, dim).flatten(1).sum(1)
            keep = index >= 0
            total.index_add_(0, index[keep], sums[keep])
        importance = (total / self.count.clamp(min=1)).sqrt()
        high = torch.full((self.groups,), -torch.inf, dtype=torch.float64, device=device).scatter_reduce(
            0, self.group_index, importance, "amax")
        low = torch.full((self.groups,), torch.inf, dtype=torch.float64, device=device).scatter_reduce(
            0, self.group_index, importance, "amin")
        spread = (high - low)[self.group_index]
        relative = torch.where(spread > 0, (high[self.group_index] - importance) / spread.clamp(min=1e-300), 0.0)
        return torch.where(spread > 0, 2.0 ** (self.alpha * relative), 0.0).float()

    @torch.no_grad()
    def apply(self) -> None:
        """Add ``reg * gamma * w`` to the gradient of every coupled slice (parameters without a gradient: skipped)."""
        gamma = self.scales()
        for name, dim, index in self.slices:
            param = self._params[name]
            if param.grad is None:
                continue
            per_position = torch.where(index >= 0, gamma[index.clamp(min=0)], 0.0).to(param.dtype)
            shape = [1] * param.dim()
            shape[dim] = -1
            param.grad.add_(self.reg * per_position.view(shape) * param.detach())
