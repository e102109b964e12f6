"""Channel importance for structured pruning: one score per coupled channel (a union-find root of the graph).

Per-filter criteria score a channel by the output filters that produce it:

- ``l1-filter`` / ``l2-filter``: L1 / L2 norm of the output filters (Li et al., "Pruning Filters for
  Efficient ConvNets", 2017), summed over coupled layers;
- ``bn-scale``: absolute BatchNorm / LayerNorm scale (Liu et al., "Network Slimming", 2017);
- ``random``: a seeded random ranking (the baseline every criterion must beat).

Group criteria follow Torch-Pruning's ``GroupMagnitudeImportance`` / ``GroupTaylorImportance`` (Fang et
al., "DepGraph: Towards Any Structural Pruning", CVPR 2023): every tensor slice that goes when the
channel goes counts, i.e. the output filter of every producer, the input slice of every consumer and the
scale of every BatchNorm / LayerNorm that sees it (biases and running statistics do not count, as in
Torch-Pruning's default). For a channel c of a dependency group:

- ``group-l2``: local importance of each coupled slice = sum of its squared weights (p = 2, no root);
- ``taylor``: local importance = sum of |w * dL/dw| over the slice (first-order Taylor, Molchanov et al.
  2019), from gradients of the cross-entropy on a few training batches;

then "mean" reduction (the average over the coupled slices) and a normalisation over the group's channels:
``mean`` (divide by the group's mean, Torch-Pruning's default) or ``max`` (divide by its maximum, what
Torch-Pruning's CIFAR benchmark uses). Normalisation only matters when channels of different groups are
ranked against each other (``global_ranking``).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.compress.graph import ChannelGraph
from convforge.errors import ConfigError

FILTER_CRITERIA = ("l1-filter", "l2-filter", "bn-scale", "random")
GROUP_CRITERIA = ("group-l2", "taylor")
NORMALIZERS = ("mean", "max")


def coupled_slices(g: ChannelGraph) -> list[tuple[str, int, list[int]]]:
    """The tensor dimensions group importance reads, as (parameter name, dim, channel id of each position):
    conv / linear weights along their outputs (dim 0) and inputs (dim 1), and norm scales."""
    keys: list[tuple[str, int]] = []
    for layer in g.layers:
        keys += [(f"{layer.name}.weight", dim) for dim in (0, 1)]
    keys += [(f"{name}.weight", 0) for name in g.norms]
    seen: set[tuple[str, int]] = set()
    found = []
    for key in keys:
        if key in g.params and key not in seen:
            seen.add(key)
            found.append((key[0], key[1], g.params[key]))
    return found


def slice_sums(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum of ``values`` over every dimension but ``dim``: one number per position along ``dim``."""
    if values.dim() == 1:
        return values
    return values.transpose(0, dim).flatten(1).sum(1)


def channel_scores(model: nn.Module, g: ChannelGraph, method: str, groups: list[list[int]], *, seed: int = 0,
                   normalizer: str = "mean", gradients: dict[str, torch.Tensor] | None = None) -> dict[int, float]:
    """The importance of every prunable root of ``g`` (``groups``: its dependency groups) under ``method``."""
    if method in GROUP_CRITERIA:
        if normalizer not in NORMALIZERS:
            raise ConfigError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, got {normalizer!r}")
        if method == "taylor" and gradients is None:
            raise ConfigError("--method taylor needs gradients from training images: give --data (a few "
                              "training batches are read)")
        return group_scores(model, g, groups, normalizer, gradients if method == "taylor" else None)
    return filter_scores(model, g, method, seed)


@torch.no_grad()
def group_scores(model: nn.Module, g: ChannelGraph, groups: list[list[int]], normalizer: str = "mean",
                 gradients: dict[str, torch.Tensor] | None = None) -> dict[int, float]:
    """Group importance (see the module docstring): squared-L2 (``gradients`` None) or Taylor (|w * grad|)
    per coupled slice, averaged over the slices of the channel, normalised over its group."""
    size = len(g.uf.parent)
    total = torch.zeros(size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    for name, dim, ids in coupled_slices(g):
        weight = model.get_parameter(name).detach().double()
        values = weight.square() if gradients is None else (weight * gradients[name].double()).abs()
        roots = torch.tensor([g.uf.find(i) for i in ids])
        total.index_add_(0, roots, slice_sums(values, dim).cpu())
        # a channel seen at several positions of one slice (flatten before a linear layer) counts it once
        count[roots.unique()] += 1
    scores: dict[int, float] = {}
    for group in groups:
        index = torch.tensor(group)
        value = total[index] / count[index].clamp(min=1)
        scale = value.mean() if normalizer == "mean" else value.max()
        if scale > 0:
            value = value / scale
        scores.update(zip(group, value.tolist()))
    return scores


def filter_scores(model: nn.Module, g: ChannelGraph, method: str, seed: int = 0) -> dict[int, float]:
    """Per-filter criteria: the norm of the output filters producing a channel, its norm scale, or random."""
    scores: dict[int, float] = defaultdict(float)
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        n = len(g.uf.parent)
        values = torch.rand(n, generator=gen).tolist()
        return {i: values[i] for i in range(n)}
    p = 2 if method == "l2-filter" else 1
    outputs = {(f"{layer.name}.weight", 0) for layer in g.layers}
    with torch.no_grad():
        for key in outputs:
            if key not in g.params:
                continue
            weight = model.get_parameter(key[0]).detach().float()
            norms = weight.flatten(1).norm(p=p, dim=1).tolist()
            for pos, i in enumerate(g.params[key]):
                scores[g.uf.find(i)] += norms[pos]
        if method == "bn-scale":
            gammas: dict[int, float] = defaultdict(float)
            for name, ids in g.norms.items():
                key = (f"{name}.weight", 0)
                if key in g.params:
                    values = model.get_parameter(key[0]).detach().abs().tolist()
                    for pos, i in enumerate(ids):
                        gammas[g.uf.find(i)] += values[pos]
            for root, value in gammas.items():
                scores[root] = value  # channels without a norm keep their filter norm
    return scores


def loss_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gradients of the summed cross-entropy over ``batches`` (normalised images, class labels) for every
    parameter, computed on a copy of ``model`` in eval mode (its BatchNorm statistics stay as they are)."""
    work = copy.deepcopy(model).eval()
    work.zero_grad(set_to_none=True)
    seen = 0
    for x, y in batches:
        F.cross_entropy(work(x), y, reduction="sum").backward()
        seen += len(y)
    if not seen:
        raise ConfigError("--method taylor read no training images: the data's train split is empty")
    return {name: (p.grad / seen if p.grad is not None else torch.zeros_like(p))
            for name, p in work.named_parameters()}
