"""Pruning: structured (filters and channels removed physically) and global magnitude (weights zeroed).

Structured methods rank the coupled channels of each dependency group (see
:mod:`convforge.compress.graph`; the criteria are in :mod:`convforge.compress.importance`:
``l1-filter``, ``l2-filter``, ``bn-scale``, ``random``, and the group criteria ``group-l2`` and
``taylor`` that aggregate over every coupled layer). By default the same share goes from every group;
with ``global_ranking`` the channels of all groups are ranked together on their (normalised) scores, so
groups lose different shares (Torch-Pruning's "global pruning"). Either way a group never goes below
``min_share`` of its channels (and never below one). With ``target_macs`` the share is found by
bisection so that the pruned model has at most that fraction of the MACs.

``global-magnitude`` is unstructured: it ranks every conv/linear weight by magnitude across layers and
zeroes the smallest, keeping at least ``min_share`` of each layer (Gupta et al., "Is Complexity Required
for Neural Network Pruning? A Case Study on Global Magnitude Pruning", 2022). The zeros do not make
dense kernels faster: the model keeps its shape and its dense MACs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from convforge.compress.graph import ChannelGraph, build_graph
from convforge.compress.importance import FILTER_CRITERIA, GROUP_CRITERIA, channel_scores
from convforge.models.widths import is_depthwise, sync_module_attrs
from convforge.errors import ConfigError, ConvforgeError
from convforge.measure import count_macs, count_params
from convforge.train.sparsity import apply_masks, prunable_weights

STRUCTURED = FILTER_CRITERIA + GROUP_CRITERIA
METHODS = STRUCTURED + ("global-magnitude",)
NO_SPEEDUP_NOTE = ("global-magnitude zeroes weights but keeps every tensor dense: dense kernels (PyTorch, "
                   "ONNX Runtime) run exactly as fast as before; the gain is in compressed size or sparse kernels")


@dataclass
class PruneResult:
    """A pruned model (None for a dry run) and what changed."""

    model: nn.Module | None
    method: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    plan: list[dict[str, Any]]
    share_removed: float | None = None
    sparsity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_ratio": self.macs_ratio, "params_before": self.params_before, "params_after": self.params_after,
                "share_removed": self.share_removed, "sparsity": self.sparsity, "plan": self.plan, "notes": self.notes}


def prune(
    model: nn.Module,
    input_size: tuple[int, int, int] | list[int],
    method: str = "l1-filter",
    *,
    target_macs: float | None = None,
    sparsity: float | None = None,
    min_share: float | None = None,
    round_to: int = 1,
    dry_run: bool = False,
    seed: int = 0,
    global_ranking: bool = False,
    normalizer: str = "mean",
    gradients: dict[str, torch.Tensor] | None = None,
) -> PruneResult:
    """Prune a copy of ``model`` (``model`` itself is not changed).

    ``target_macs``: fraction of the MACs to keep (structured methods); ``sparsity``: share of the
    channels of every group to remove (structured) or of all conv/linear weights to zero
    (global-magnitude). ``min_share``: the least share kept of each group / layer (default 0.1 for
    structured methods, 0.02 for global magnitude). ``round_to``: keep a multiple of this many channels
    in every group (e.g. 8: vectorised CPU kernels prefer such widths). ``global_ranking``: rank the
    channels of all groups together (see the module docstring); ``normalizer``: ``mean`` or ``max``, how
    the group criteria normalise scores within a group; ``gradients``: parameter name -> gradient of the
    loss, what ``taylor`` needs (see :func:`convforge.compress.importance.loss_gradients`).
    """
    input_size = tuple(int(v) for v in input_size)
    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r}: use one of {', '.join(METHODS)}")
    if (target_macs is None) == (sparsity is None):
        raise ConfigError("give exactly one of --target-macs (fraction of MACs to keep) or --sparsity")
    if target_macs is not None and not (isinstance(target_macs, (int, float)) and 0 < target_macs <= 1):
        raise ConfigError(f"--target-macs is the fraction of MACs to keep, in (0, 1], got {target_macs}")
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise ConfigError(f"--sparsity is the share removed, in [0, 1), got {sparsity}")
    if min_share is None:
        min_share = 0.02 if method == "global-magnitude" else 0.1
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"--round-to must be an integer >= 1, got {round_to}")
    if not 0 < min_share <= 1:
        raise ConfigError(f"--min-share must be in (0, 1], got {min_share}")
    if method == "global-magnitude":
        if target_macs is not None:
            raise ConfigError("global-magnitude zeroes single weights and does not reduce dense MACs: use --sparsity "
                              "(share of weights to zero), or a structured method for --target-macs")
        return _global_magnitude(model, input_size, float(sparsity), min_share, dry_run)
    g = build_graph(model, input_size)
    groups = g.dependency_groups()
    scores = channel_scores(model, g, method, groups, seed=seed, normalizer=normalizer, gradients=gradients)
    ranking = _Ranking(groups, scores, min_share, round_to, {g.uf.find(i) for i in g.group_units}, global_ranking)
    result = _structured(model, input_size, g, ranking, target_macs, sparsity, dry_run)
    result.method = method
    return result


# ---------------------------------------------------------------- structured


class _Ranking:
    """Which roots survive when a share of the channels goes: the same share of every group (default), or
    the least important channels across groups (``global_ranking``); either way no group goes below its
    minimum, and ``round_to`` rounds the kept count of a group up to a multiple (groups holding a root of
    ``unrounded``, whole groups of a grouped conv, are not rounded)."""

    def __init__(self, groups: list[list[int]], scores: dict[int, float], min_share: float, round_to: int,
                 unrounded: set[int], global_ranking: bool) -> None:
        # most important first in a group; ties broken by root id the same way in both orders
        self.ordered = [sorted(group, key=lambda r: (-scores.get(r, 0.0), r)) for group in groups]
        self.min_share, self.round_to, self.global_ranking = min_share, round_to, global_ranking
        self.steps = [1 if unrounded.intersection(group) else round_to for group in self.ordered]
        self.floors = [max(1, math.ceil(min_share * len(group) - 1e-9)) for group in self.ordered]
        self.group_of = {r: j for j, group in enumerate(self.ordered) for r in group}
        self.rank = sorted(self.group_of, key=lambda r: (scores.get(r, 0.0), -r))  # least important first
        self.total = len(self.group_of)

    def keep(self, share: float) -> set[int]:
        """The roots kept when ``share`` of the channels goes."""
        if self.global_ranking:
            counts = [len(group) for group in self.ordered]
            budget = math.floor(share * self.total + 1e-9)
            for r in self.rank:
                if budget <= 0:
                    break
                j = self.group_of[r]
                if counts[j] > self.floors[j]:
                    counts[j] -= 1
                    budget -= 1
        else:
            counts = [max(floor, len(group) - math.floor(share * len(group) + 1e-9))
                      for floor, group in zip(self.floors, self.ordered)]
        keep: set[int] = set()
        for group, k, step in zip(self.ordered, counts, self.steps):
            keep.update(group[:min(len(group), math.ceil(k / step) * step)])
        return keep

    def refine(self, g: ChannelGraph, keep: set[int], budget: float) -> set[int]:
        """Give channels back (a group's rounding step at a time, its most important first; with global ranking
        the most important of all groups first) while the MACs stay within ``budget``: bisection is coarse."""
        keep = set(keep)
        current = g.macs(keep)
        progress = True
        while progress:
            progress = False
            blocks = [[r for r in group if r not in keep][:step] for group, step in zip(self.ordered, self.steps)]
            if self.global_ranking:
                position = {r: n for n, r in enumerate(self.rank)}
                blocks.sort(key=lambda block: -position[block[0]] if block else 0)
            for block in blocks:
                if not block:
                    continue
                candidate = keep | set(block)
                macs = g.macs(candidate)
                if current < macs <= budget:
                    keep, current, progress = candidate, macs, True
            if len(self.ordered) > 200:
                break  # large graphs: one pass is close enough
        return keep


def _structured(model, input_size, g: ChannelGraph, ranking: _Ranking, target_macs, sparsity, dry_run) -> PruneResult:
    macs_before = count_macs(model, input_size)
    params_before = count_params(model)
    other_macs = macs_before - g.macs()  # MACs the graph does not model (matmuls of attention, ...): unchanged
    ordered = ranking.ordered
    if not ordered:
        raise ConvforgeError(f"{type(model).__name__} has no prunable channel group (every channel is coupled to "
                             f"the input, the logits or an operation that cannot be pruned)")

    def macs_at(share: float) -> int:
        return g.macs(ranking.keep(share)) + other_macs

    if sparsity is not None:
        share = float(sparsity)
    else:
        target = target_macs * macs_before
        floor_macs = macs_at(1.0)
        if floor_macs > target * (1 + 1e-9):
            raise ConvforgeError(
                f"--target-macs {target_macs:g} is below what this model can reach: with every channel group kept at "
                f"its minimum (--min-share {ranking.min_share:g}, at least one channel) it still needs {floor_macs:,} "
                f"of {macs_before:,} MACs, i.e. the reachable minimum is --target-macs {floor_macs / macs_before:.4f}"
            )
        lo, hi = 0.0, 1.0  # macs_at(lo) > target >= macs_at(hi)
        if macs_at(0.0) <= target:
            hi = 0.0
        else:
            for _ in range(40):
                mid = (lo + hi) / 2
                if macs_at(mid) <= target:
                    hi = mid
                else:
                    lo = mid
        share = hi
    keep = ranking.keep(share)
    if sparsity is None:
        keep = ranking.refine(g, keep, target_macs * macs_before - other_macs)
    plan = _plan(g, keep)
    notes = list(g.notes)
    grouped = [layer.name for layer in g.layers if layer.kind == "grouped"]
    if grouped:
        notes.append(f"grouped convolutions are pruned a whole group at a time (their group width stays): "
                     f"{', '.join(grouped[:8])}" + (" ..." if len(grouped) > 8 else ""))
    if dry_run:
        macs_after = g.macs(keep) + other_macs
        removed_params = _removed_params(model, g, keep)
        return PruneResult(None, "", macs_before, macs_after, params_before, params_before - removed_params,
                           plan, share, notes=notes)
    pruned = copy.deepcopy(model)
    apply_keep(pruned, g, keep)
    _check_forward(pruned, input_size)
    return PruneResult(pruned, "", macs_before, count_macs(pruned, input_size), params_before,
                       count_params(pruned), plan, share, notes=notes)


def _removed_params(model: nn.Module, g: ChannelGraph, keep: set[int]) -> int:
    shapes: dict[str, list[int]] = {}
    for (name, dim), ids in g.params.items():
        try:
            tensor = model.get_parameter(name)
        except AttributeError:
            continue
        shape = shapes.setdefault(name, list(tensor.shape))
        shape[dim] = sum(1 for i in ids if g.uf.fixed[r := g.uf.find(i)] or r in keep)
    total = 0
    for name, shape in shapes.items():
        total += model.get_parameter(name).numel() - math.prod(shape)
    return total


def _plan(g: ChannelGraph, keep: set[int]) -> list[dict[str, Any]]:
    def kept(ids):
        return None if ids is None else sum(1 for i in ids if g.uf.fixed[r := g.uf.find(i)] or r in keep)

    plan = []
    for layer in g.layers:
        in_old = None if layer.in_ids is None else len(layer.in_ids)
        in_new = kept(layer.in_ids)
        out_old, out_new = len(layer.out_ids), kept(layer.out_ids)
        if layer.kind in ("depthwise", "grouped"):
            macs_old, macs_new = out_old * layer.macs_per_pair, out_new * layer.macs_per_pair
        else:
            macs_old = in_old * out_old * layer.macs_per_pair
            macs_new = in_new * out_new * layer.macs_per_pair
        plan.append({"layer": layer.name, "kind": layer.kind, "in": [in_old, in_new], "out": [out_old, out_new],
                     "macs": [macs_old, macs_new]})
    return plan


@torch.no_grad()
def apply_keep(model: nn.Module, g: ChannelGraph, keep: set[int]) -> nn.Module:
    """Slice every channel-indexed tensor of ``model`` to the surviving channels, in place."""
    depthwise = {name: is_depthwise(m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    owners: set[str] = set()
    for (name, dim), ids in g.params.items():
        index = [pos for pos, i in enumerate(ids) if g.uf.fixed[r := g.uf.find(i)] or r in keep]
        if len(index) == len(ids):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        old = getattr(owner, attr)
        if old.shape[dim] != len(ids):
            raise ConvforgeError(f"internal error: {name} has {old.shape[dim]} entries on dim {dim}, graph says {len(ids)}")
        new = old.detach().index_select(dim, torch.tensor(index, device=old.device)).clone()
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            owner._buffers[attr] = new
        owners.add(owner_name)
    for name, ids in g.norms.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.LayerNorm) and module.weight is None:
            module.normalized_shape = (sum(1 for i in ids if g.uf.fixed[r := g.uf.find(i)] or r in keep),)
    for owner_name in owners:
        sync_module_attrs(model.get_submodule(owner_name) if owner_name else model, depthwise.get(owner_name, False))
    return model


def _check_forward(model: nn.Module, input_size: tuple[int, ...]) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros((2, *input_size))
            model(x)
            if hasattr(model, "forward_head") and hasattr(model, "num_features"):
                model.num_features = int(model.forward_head(model.forward_features(x), pre_logits=True).shape[1])
    except Exception as exc:  # noqa: BLE001 - a bug in the dependency rules shows up here, not later
        raise ConvforgeError(f"internal error: the pruned {type(model).__name__} does not run "
                             f"({type(exc).__name__}: {str(exc)[:300]}); please report it") from None
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- global magnitude


def magnitude_masks(model: nn.Module, sparsity: float, min_share: float) -> dict[str, torch.Tensor]:
    """Boolean masks (True = kept) zeroing ``sparsity`` of all conv/linear weights by global magnitude,
    keeping at least ``ceil(min_share * n)`` weights of every layer."""
    weights = prunable_weights(model)
    if not weights:
        raise ConvforgeError(f"{type(model).__name__} has no convolution or linear weights to prune")
    sizes = [w.numel() for _, w in weights]
    minimum = [max(1, math.ceil(min_share * n - 1e-9)) for n in sizes]
    total = sum(sizes)
    budget = total - round(sparsity * total)
    if budget < sum(minimum):
        raise ConvforgeError(
            f"--sparsity {sparsity:g} is beyond what this model can reach: keeping --min-share {min_share:g} of every "
            f"layer keeps {sum(minimum):,} of {total:,} weights, so the reachable maximum is --sparsity "
            f"{1 - sum(minimum) / total:.4f}"
        )
    with torch.no_grad():
        sorted_layers = [w.detach().abs().flatten().float().sort(descending=True).values for _, w in weights]
        everything = torch.cat(sorted_layers).sort(descending=True).values

        def kept_at(threshold: torch.Tensor) -> list[int]:
            return [max(m, int((s >= threshold).sum())) for m, s in zip(minimum, sorted_layers)]

        lo, hi = 0, everything.numel() - 1  # find the smallest threshold (largest index) whose kept count fits
        best = [m for m in minimum]
        while lo <= hi:
            mid = (lo + hi) // 2
            counts = kept_at(everything[mid])
            if sum(counts) <= budget:
                best, lo = counts, mid + 1
            else:
                hi = mid - 1
        masks = {}
        for (name, w), k in zip(weights, best):
            flat = w.detach().abs().flatten()
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[flat.topk(k).indices] = True
            masks[name] = mask.view_as(w)
    return masks


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    layers = {}
    zeros = total = 0
    for name, w in prunable_weights(model):
        z = int((w == 0).sum())
        layers[name[: -len(".weight")]] = {"weights": w.numel(), "zeros": z, "sparsity": z / w.numel()}
        zeros += z
        total += w.numel()
    return {"overall": zeros / max(total, 1), "weights": total, "zeros": zeros, "layers": layers}


def _global_magnitude(model, input_size, sparsity, min_share, dry_run) -> PruneResult:
    macs = count_macs(model, input_size)
    params = count_params(model)
    masks = magnitude_masks(model, sparsity, min_share)
    plan = []
    zeros = total = 0
    for name, w in prunable_weights(model):
        z = int((~masks[name]).sum())
        plan.append({"layer": name[: -len(".weight")], "weights": w.numel(), "kept": w.numel() - z,
                     "sparsity": z / w.numel()})
        zeros += z
        total += w.numel()
    report = {"overall": zeros / total, "weights": total, "zeros": zeros, "min_share": min_share}
    if dry_run:
        return PruneResult(None, "global-magnitude", macs, macs, params, params, plan, sparsity=report,
                           notes=[NO_SPEEDUP_NOTE])
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    return PruneResult(pruned, "global-magnitude", macs, macs, params, params, plan, sparsity=report,
                       notes=[NO_SPEEDUP_NOTE])
