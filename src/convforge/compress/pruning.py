"""Pruning: structured (filters and channels removed physically) and global magnitude (weights zeroed).

Structured methods (``l1-filter``, ``l2-filter``, ``bn-scale``, ``random``) rank the coupled channels of
each channel group (see :mod:`convforge.compress.graph`) and remove the same share from every group,
never going below ``min_share`` of a group (and never below one channel). With ``target_macs`` the
share is found by bisection so that the pruned model has at most that fraction of the MACs.

- ``l1-filter`` / ``l2-filter``: L1 / L2 norm of the output filters of the group's layers
  (Li et al., "Pruning Filters for Efficient ConvNets", 2017), summed over coupled layers;
- ``bn-scale``: absolute BatchNorm / LayerNorm scale of the channel (Liu et al., "Learning Efficient
  Convolutional Networks through Network Slimming", 2017; here without their sparsity training);
- ``random``: a seeded random ranking (the baseline every method must beat);
- ``global-magnitude``: unstructured; ranks every conv/linear weight by magnitude across layers and
  zeroes the smallest, keeping at least ``min_share`` of each layer (Gupta et al., "Is Complexity
  Required for Neural Network Pruning? A Case Study on Global Magnitude Pruning", 2022). The zeros do
  not make dense kernels faster: the model keeps its shape and its dense MACs.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from convforge.compress.graph import ChannelGraph, build_graph
from convforge.models.widths import is_depthwise, sync_module_attrs
from convforge.errors import ConfigError, ConvforgeError
from convforge.measure import count_macs, count_params
from convforge.train.sparsity import apply_masks, prunable_weights

STRUCTURED = ("l1-filter", "l2-filter", "bn-scale", "random")
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
) -> PruneResult:
    """Prune a copy of ``model`` (``model`` itself is not changed).

    ``target_macs``: fraction of the MACs to keep (structured methods); ``sparsity``: share of the
    channels of every group to remove (structured) or of all conv/linear weights to zero
    (global-magnitude). ``min_share``: the least share kept of each group / layer (default 0.1 for
    structured methods, 0.02 for global magnitude). ``round_to``: keep a multiple of this many channels
    in every group (e.g. 8: vectorised CPU kernels prefer such widths).
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
    return _structured(model, input_size, method, target_macs, sparsity, min_share, dry_run, seed, round_to)


# ---------------------------------------------------------------- structured


def _groups(g: ChannelGraph) -> list[list[int]]:
    """Prunable roots grouped by the set of parameter dimensions they index (one group per coupled layer set)."""
    roots = g.prunable_roots()
    signature: dict[int, set] = defaultdict(set)
    for key, ids in g.params.items():
        for i in ids:
            r = g.uf.find(i)
            if r in roots:
                signature[r].add(key)
    grouped: dict[frozenset, list[int]] = defaultdict(list)
    for r in sorted(roots):
        grouped[frozenset(signature[r])].append(r)
    return list(grouped.values())


def _importance(model: nn.Module, g: ChannelGraph, method: str, seed: int) -> dict[int, float]:
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


def _keep_set(ordered: list[list[int]], share: float, min_share: float, round_to: int = 1,
              unrounded: set[int] | None = None) -> set[int]:
    """The roots kept when ``share`` of every coupled set goes; ``round_to`` rounds the kept count of a set up to
    a multiple (sets holding a root of ``unrounded``, whole groups of a grouped conv, are not rounded)."""
    keep: set[int] = set()
    for group in ordered:
        n = len(group)
        k = max(1, math.ceil(min_share * n - 1e-9), n - math.floor(share * n + 1e-9))
        step = 1 if unrounded and unrounded.intersection(group) else round_to
        k = min(n, math.ceil(k / step) * step)
        keep.update(group[:k])
    return keep


def _structured(model, input_size, method, target_macs, sparsity, min_share, dry_run, seed, round_to=1) -> PruneResult:
    g = build_graph(model, input_size)
    macs_before = count_macs(model, input_size)
    params_before = count_params(model)
    other_macs = macs_before - g.macs()  # MACs the graph does not model (matmuls of attention, ...): unchanged
    scores = _importance(model, g, method, seed)
    ordered = [sorted(group, key=lambda r: -scores.get(r, 0.0)) for group in _groups(g)]
    if not ordered:
        raise ConvforgeError(f"{type(model).__name__} has no prunable channel group (every channel is coupled to "
                             f"the input, the logits or an operation that cannot be pruned)")

    units = {g.uf.find(i) for i in g.group_units}

    def macs_at(share: float) -> int:
        return g.macs(_keep_set(ordered, share, min_share, round_to, units)) + other_macs

    if sparsity is not None:
        share = float(sparsity)
    else:
        target = target_macs * macs_before
        floor_macs = macs_at(1.0)
        if floor_macs > target * (1 + 1e-9):
            raise ConvforgeError(
                f"--target-macs {target_macs:g} is below what this model can reach: with every channel group kept at "
                f"its minimum (--min-share {min_share:g}, at least one channel) it still needs {floor_macs:,} of "
                f"{macs_before:,} MACs, i.e. the reachable minimum is --target-macs {floor_macs / macs_before:.4f}"
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
    keep = _keep_set(ordered, share, min_share, round_to, units)
    if sparsity is None and round_to == 1:
        keep = _refine(g, ordered, keep, target_macs * macs_before - other_macs)
    plan = _plan(g, keep)
    notes = list(g.notes)
    grouped = [layer.name for layer in g.layers if layer.kind == "grouped"]
    if grouped:
        notes.append(f"grouped convolutions are pruned a whole group at a time (their group width stays): "
                     f"{', '.join(grouped[:8])}" + (" ..." if len(grouped) > 8 else ""))
    if dry_run:
        macs_after = g.macs(keep) + other_macs
        removed_params = _removed_params(model, g, keep)
        return PruneResult(None, method, macs_before, macs_after, params_before, params_before - removed_params,
                           plan, share, notes=notes)
    pruned = copy.deepcopy(model)
    apply_keep(pruned, g, keep)
    _check_forward(pruned, input_size)
    return PruneResult(pruned, method, macs_before, count_macs(pruned, input_size), params_before,
                       count_params(pruned), plan, share, notes=notes)


def _refine(g: ChannelGraph, ordered: list[list[int]], keep: set[int], budget: float) -> set[int]:
    """Give channels back, one group at a time, while the MACs stay within ``budget`` (bisection is coarse)."""
    keep = set(keep)
    current = g.macs(keep)
    progress = True
    while progress:
        progress = False
        for group in ordered:
            missing = [r for r in group if r not in keep]
            if not missing:
                continue
            candidate = keep | {missing[0]}
            macs = g.macs(candidate)
            if macs <= budget and macs > current:
                keep, current, progress = candidate, macs, True
        if len(ordered) > 200:
            break  # large graphs: one pass is close enough
    return keep


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
