"""Channel dependency graph of a model, found by tracing it with torch.fx.

The idea is Torch-Pruning's DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning",
CVPR 2023), written here from scratch at the granularity of single channels:

- every channel of every intermediate tensor carries an integer *channel id*;
- a convolution or linear layer creates fresh ids for its outputs; operations that do not mix
  channels (BatchNorm, activations, pooling, depthwise convolutions, permutes, flatten over
  1x1 maps) pass ids through; element-wise operations between tensors (residual additions,
  squeeze-excite gates, layer scale) *merge* the ids of the channels they combine; concatenation
  along channels concatenates the id lists (DenseNet); a grouped convolution merges the input and
  output ids of each of its groups, so a group goes or stays whole and the group width is kept
  (ResNeXt, RegNet);
- ids that cannot be removed are *fixed*: the model input, the logits, channels produced by a
  zero-pad on the channel axis (the option-A shortcuts of the CIFAR ResNets), and every channel
  that meets an operation this module does not know (attention, custom functions): unknown
  means "do not touch", never a wrong guess.

Merged ids form coupled channels (a union-find root): removing one removes, in every layer that
sees it, the corresponding output filter, input slice, norm entry and per-channel parameter.
The graph records, for every parameter dimension that is indexed by channels, the id of each
position, so that pruning is a matter of keeping the positions whose id survives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from convforge.errors import ConvforgeError


class UnionFind:
    """Channel ids with union-find merging and a "fixed" (not prunable) flag per root."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []

    def new(self, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.fixed[ra] = self.fixed[ra] or self.fixed[rb]

    def fix(self, a: int) -> None:
        self.fixed[self.find(a)] = True

    def is_fixed(self, a: int) -> bool:
        return self.fixed[self.find(a)]


@dataclass
class LayerRecord:
    """A convolution or linear layer: its input/output channel ids and MACs per (in, out) channel pair."""

    name: str
    kind: str  # "conv", "depthwise", "grouped", "linear"
    in_ids: list[int] | None
    out_ids: list[int]
    macs_per_pair: int  # conv/linear: k*k*positions; depthwise: k*k*positions per channel;
    # grouped: (inputs per group)*k*k*positions per output channel


@dataclass
class ChannelGraph:
    """What tracing found: channel ids of every channel-indexed parameter dimension, layers and norms."""

    uf: UnionFind
    params: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (qualified name, dim) -> ids
    layers: list[LayerRecord] = field(default_factory=list)
    norms: dict[str, list[int]] = field(default_factory=dict)  # BatchNorm / LayerNorm module name -> ids
    module_channels: dict[str, tuple[list[int] | None, list[int]]] = field(default_factory=dict)
    group_units: list[int] = field(default_factory=list)  # one channel id of each group of a grouped conv
    notes: list[str] = field(default_factory=list)

    def add_param(self, name: str, dim: int, ids: list[int]) -> None:
        key = (name, dim)
        if key in self.params:
            old = self.params[key]
            if len(old) != len(ids):
                for i in old + ids:
                    self.uf.fix(i)
                return
            for a, b in zip(old, ids):
                self.uf.union(a, b)
        else:
            self.params[key] = list(ids)

    def roots(self, ids: Iterable[int]) -> list[int]:
        return [self.uf.find(i) for i in ids]

    def prunable_roots(self) -> set[int]:
        """Roots that appear in at least one parameter and are not fixed."""
        found: set[int] = set()
        for ids in self.params.values():
            for i in ids:
                root = self.uf.find(i)
                if not self.uf.fixed[root]:
                    found.add(root)
        return found

    def dependency_groups(self) -> list[list[int]]:
        """Prunable roots grouped by the set of parameter dimensions they index: one group per set of coupled
        layers (e.g. all channels of a residual stage), each in increasing root order."""
        roots = self.prunable_roots()
        signature: dict[int, set] = {r: set() for r in roots}
        for key, ids in self.params.items():
            for i in ids:
                r = self.uf.find(i)
                if r in roots:
                    signature[r].add(key)
        grouped: dict[frozenset, list[int]] = {}
        for r in sorted(roots):
            grouped.setdefault(frozenset(signature[r]), []).append(r)
        return list(grouped.values())

    def macs(self, keep: set[int] | None = None) -> int:
        """MACs of the convolutions and linear layers if only the roots in ``keep`` survived (None: all)."""
        def count(ids: list[int] | None) -> int:
            if ids is None:
                return 1
            if keep is None:
                return len(ids)
            return sum(1 for i in ids if self.uf.fixed[r := self.uf.find(i)] or r in keep)

        total = 0
        for layer in self.layers:
            if layer.kind in ("depthwise", "grouped"):
                total += count(layer.out_ids) * layer.macs_per_pair
            else:
                total += count(layer.in_ids) * count(layer.out_ids) * layer.macs_per_pair
        return total


# Modules and functions that neither mix channels nor change where the channel axis is.
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.Hardtanh, nn.Softplus,
)
_PASS_NAMES = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "sigmoid_", "hardswish", "hardsigmoid", "tanh",
    "leaky_relu", "elu", "mish", "softplus", "hardtanh", "dropout", "dropout2d", "avg_pool2d", "max_pool2d",
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "contiguous", "clone", "interpolate", "neg", "float",
    "to", "detach", "abs", "exp", "clamp", "clamp_min", "clamp_max",
}
_ELEMENTWISE = {"add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "add_", "mul_",
                "sub_", "div_", "where"}


def _name_of(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    return getattr(target, "__name__", str(target))


def _meta(node: Any) -> TensorMetadata | None:
    if isinstance(node, torch.fx.Node):
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return meta
    return None


class _Tracer(torch.fx.Tracer):
    """Standard leaves (torch.nn modules); everything else is traced through."""


def trace(model: nn.Module, input_size: tuple[int, ...]) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds of errors
        raise ConvforgeError(
            f"cannot trace {type(model).__name__} with torch.fx for structured pruning ({type(exc).__name__}: "
            f"{str(exc)[:200]}); use --method global-magnitude, which needs no tracing"
        ) from None
    gm = torch.fx.GraphModule(model, graph)
    x = torch.zeros((2, *input_size))
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    model.train(was_training)
    return gm, x


def build_graph(model: nn.Module, input_size: tuple[int, ...]) -> ChannelGraph:
    """Trace ``model`` at ``input_size`` (C, H, W) and return its channel dependency graph."""
    gm, _ = trace(model, input_size)
    modules = dict(model.named_modules())
    g = ChannelGraph(UnionFind())
    uf = g.uf
    info: dict[torch.fx.Node, tuple[list[int] | None, int | None]] = {}
    attrs: dict[torch.fx.Node, str] = {}

    def fresh(n: int, fixed: bool = False) -> list[int]:
        return [uf.new(fixed) for _ in range(n)]

    def fix_all(ids: list[int] | None) -> None:
        for i in ids or ():
            uf.fix(i)

    def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n in info else None)
        return found

    def unknown(node: torch.fx.Node, why: str = "") -> None:
        for src in tensor_inputs(node):
            fix_all(info[src][0])
        # parameters used by unknown operations are left as they are (their channels are fixed above)
        info[node] = (None, None)

    def _attr_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n in attrs else None)
        return found

    def passthrough(node: torch.fx.Node, src: torch.fx.Node) -> None:
        ids, cdim = info.get(src, (None, None))
        out = _meta(node)
        in_meta = _meta(src)
        if ids is None or out is None or in_meta is None:
            info[node] = (None, None)
            return
        if len(out.shape) != len(in_meta.shape) or out.shape[cdim] != len(ids):
            fix_all(ids)
            info[node] = (None, None)
            return
        info[node] = (ids, cdim)

    def ids_or_fixed(src: Any, size: int) -> list[int]:
        ids, _ = info.get(src, (None, None)) if isinstance(src, torch.fx.Node) else (None, None)
        return ids if ids is not None and len(ids) == size else fresh(size, fixed=True)

    for node in gm.graph.nodes:
        meta = _meta(node)
        if node.op == "placeholder":
            info[node] = (fresh(meta.shape[1], fixed=True), 1) if meta is not None and len(meta.shape) >= 2 else (None, None)
        elif node.op == "get_attr":
            attrs[node] = str(node.target)
        elif node.op == "output":
            for src in tensor_inputs(node):
                fix_all(info[src][0])
        elif node.op == "call_module":
            _module_rule(g, node, modules[str(node.target)], info, fresh, fix_all, passthrough, ids_or_fixed, unknown)
        elif node.op in ("call_function", "call_method"):
            if meta is None:
                # sizes, shapes and other non-tensor values: computed at run time, nothing to record
                if not (isinstance(node.target, str) and node.target in ("size", "dim")) and \
                        node.target is not getattr and _name_of(node) not in ("getitem", "getattr"):
                    unknown(node)
                else:
                    info[node] = (None, None)
                continue
            _function_rule(g, node, info, attrs, fresh, fix_all, passthrough, unknown)
    return g


def _module_rule(g: ChannelGraph, node, module, info, fresh, fix_all, passthrough, ids_or_fixed, unknown) -> None:
    name = str(node.target)
    src = node.args[0] if node.args else None
    out = _meta(node)
    in_meta = _meta(src)
    ids, cdim = info.get(src, (None, None)) if isinstance(src, torch.fx.Node) else (None, None)
    if type(module) is nn.Conv2d and in_meta is not None and out is not None and len(in_meta.shape) == 4:
        k = module.kernel_size[0] * module.kernel_size[1]
        positions = out.shape[2] * out.shape[3]
        in_ids = ids if ids is not None and cdim == 1 else fresh(module.in_channels, fixed=True)
        if ids is not None and cdim != 1:
            fix_all(ids)
        if module.groups == 1:
            out_ids = fresh(module.out_channels)
            g.add_param(f"{name}.weight", 0, out_ids)
            g.add_param(f"{name}.weight", 1, in_ids)
            g.layers.append(LayerRecord(name, "conv", in_ids, out_ids, k * positions))
        elif module.groups == module.in_channels == module.out_channels:
            out_ids = in_ids
            g.add_param(f"{name}.weight", 0, out_ids)
            g.layers.append(LayerRecord(name, "depthwise", None, out_ids, k * positions))
        else:
            # Grouped: a whole group goes or stays, so its input and output channels become one unit (one
            # root); each kept output channel still reads in_channels / groups inputs.
            out_ids = fresh(module.out_channels)
            in_per, out_per = module.in_channels // module.groups, module.out_channels // module.groups
            for j in range(module.groups):
                members = in_ids[j * in_per:(j + 1) * in_per] + out_ids[j * out_per:(j + 1) * out_per]
                for other in members[1:]:
                    g.uf.union(members[0], other)
                g.group_units.append(members[0])
            g.add_param(f"{name}.weight", 0, out_ids)
            g.layers.append(LayerRecord(name, "grouped", in_ids, out_ids, in_per * k * positions))
        if module.bias is not None:
            g.add_param(f"{name}.bias", 0, out_ids)
        g.module_channels[name] = (in_ids, out_ids)
        info[node] = (out_ids, 1)
    elif type(module) is nn.Linear and in_meta is not None and out is not None:
        last = len(in_meta.shape) - 1
        if ids is not None and cdim != last:
            fix_all(ids)
        in_ids = ids if ids is not None and cdim == last else fresh(module.in_features, fixed=True)
        out_ids = fresh(module.out_features)
        positions = math.prod(out.shape[1:-1]) if len(out.shape) > 2 else 1
        g.add_param(f"{name}.weight", 0, out_ids)
        g.add_param(f"{name}.weight", 1, in_ids)
        if module.bias is not None:
            g.add_param(f"{name}.bias", 0, out_ids)
        g.layers.append(LayerRecord(name, "linear", in_ids, out_ids, positions))
        g.module_channels[name] = (in_ids, out_ids)
        info[node] = (out_ids, last)
    elif type(module) in (nn.BatchNorm2d, nn.BatchNorm1d) and ids is not None and cdim == 1:
        for pname in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, pname, None) is not None:
                g.add_param(f"{name}.{pname}", 0, ids)
        g.norms[name] = ids
        g.module_channels[name] = (ids, ids)
        passthrough(node, src)
    elif (type(module) is nn.LayerNorm and ids is not None and in_meta is not None
          and len(module.normalized_shape) == 1 and cdim == len(in_meta.shape) - 1):
        if module.elementwise_affine:
            g.add_param(f"{name}.weight", 0, ids)
            if module.bias is not None:
                g.add_param(f"{name}.bias", 0, ids)
        g.norms[name] = ids
        g.module_channels[name] = (ids, ids)
        passthrough(node, src)
    elif isinstance(module, _PASS_MODULES) and isinstance(src, torch.fx.Node) and len(node.args) == 1:
        passthrough(node, src)
    elif type(module) is nn.Flatten:
        _flatten(node, src, module.start_dim, module.end_dim, info, fix_all)
    else:
        if type(module) in (nn.Conv2d, nn.Linear):
            g.notes.append(f"{name}: called on an input of unexpected shape; its channels are kept")
        unknown(node)


def _flatten(node, src, start: int, end: int, info, fix_all) -> None:
    ids, cdim = info.get(src, (None, None))
    in_meta = _meta(src)
    if ids is None or in_meta is None:
        info[node] = (None, None)
        return
    nd = len(in_meta.shape)
    start, end = start % nd, end % nd
    if cdim < start:
        info[node] = (ids, cdim)
    elif cdim > end:
        info[node] = (ids, cdim - (end - start))
    else:
        before = math.prod(in_meta.shape[start:cdim])
        after = math.prod(in_meta.shape[cdim + 1:end + 1])
        if before == 1:
            info[node] = ([i for i in ids for _ in range(after)], start)  # channel-major: each id `after` times
        else:
            fix_all(ids)
            info[node] = (None, None)


def _function_rule(g: ChannelGraph, node, info, attrs, fresh, fix_all, passthrough, unknown) -> None:
    name = _name_of(node)
    args = list(node.args)
    first = args[0] if args else None
    if name in _PASS_NAMES and isinstance(first, torch.fx.Node) and first in info:
        others = [a for a in args[1:] if isinstance(a, torch.fx.Node) and (a in info or a in attrs)]
        if not others:
            passthrough(node, first)
            return
    if name in _ELEMENTWISE:
        _elementwise(g, node, info, attrs, fix_all)
        return
    if name == "cat":
        if not _cat_rule(g, node, args, info):
            unknown(node)
        return
    rule = _SHAPE_RULES.get(name)
    if rule is None or not (isinstance(first, torch.fx.Node) and first in info):
        unknown(node)
        return
    if info[first][0] is None and name in _UNTRACKED_STAYS_UNTRACKED:
        info[node] = (None, None)
        return
    if not rule(g, node, name, args, info, attrs, fresh, fix_all):
        unknown(node)


def _cat_rule(g: ChannelGraph, node, args, info) -> bool:
    """Concatenation: along the channel axis the ids are joined, along another axis they are unified."""
    tensors = args[0] if args else node.kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) and t in info for t in tensors):
        return False
    parts = [info[t] for t in tensors]
    dim = dim % len(_meta(node).shape)
    if any(p[0] is None for p in parts) or len({p[1] for p in parts}) != 1:
        return False
    cdim = parts[0][1]
    if dim == cdim:
        info[node] = ([i for p in parts for i in p[0]], cdim)
    else:
        for p in parts[1:]:
            for a, b in zip(parts[0][0], p[0]):
                g.uf.union(a, b)
        info[node] = (parts[0][0], cdim)
    return True


def _pad_rule(g, node, name, args, info, attrs, fresh, fix_all) -> bool:
    """Padding the channel axis adds fixed (unprunable) channels before and after."""
    first = args[0]
    ids, cdim = info[first]
    pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
    if ids is None or not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
        return False
    axis = len(_meta(first).shape) - 1 - cdim  # pad pairs run from the last dimension backwards
    if 2 * axis + 1 < len(pad):
        before, after = pad[2 * axis], pad[2 * axis + 1]
        if before < 0 or after < 0:
            return False
        info[node] = (fresh(before, fixed=True) + ids + fresh(after, fixed=True), cdim)
    else:
        info[node] = (ids, cdim)
    return True


def _getitem_rule(g, node, name, args, info, attrs, fresh, fix_all) -> bool:
    """Indexing that keeps the whole channel axis (integers before it shift its position)."""
    ids, cdim = info[args[0]]
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if any(i is Ellipsis or i is None or isinstance(i, torch.fx.Node) for i in index):
        return False
    if cdim < len(index) and not (isinstance(index[cdim], slice) and index[cdim] == slice(None)):
        return False
    info[node] = (ids, cdim - sum(1 for i in index[:cdim] if isinstance(i, int)))
    return True


def _flatten_rule(g, node, name, args, info, attrs, fresh, fix_all) -> bool:
    start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
    _flatten(node, args[0], start, end, info, fix_all)
    return True


def _permute_rule(g, node, name, args, info, attrs, fresh, fix_all) -> bool:
    """permute/transpose move the channel axis."""
    ids, cdim = info[args[0]]
    nd = len(_meta(node).shape)
    if name == "permute":
        dims = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
        dims = [d % nd for d in dims]
        info[node] = (ids, dims.index(cdim))
    else:
        a, b = args[1] % nd, args[2] % nd
        info[node] = (ids, b if cdim == a else a if cdim == b else cdim)
    return True


def _view_rule(g, node, name, args, info, attrs, fresh, fix_all) -> bool:
    """view/reshape that keep the channel axis whole, or fold it channel-major into the last axis."""
    ids, cdim = info[args[0]]
    ishape, oshape = list(_meta(args[0]).shape), list(_meta(node).shape)
    prefix = math.prod(ishape[:cdim])
    rest = math.prod(ishape[cdim + 1:])
    for j in range(len(oshape)):
        if math.prod(oshape[:j]) == prefix:
            if oshape[j] == len(ids) and math.prod(oshape[j + 1:]) == rest:
                info[node] = (ids, j)
                return True
            if j == len(oshape) - 1 and oshape[j] == len(ids) * rest:
                info[node] = ([i for i in ids for _ in range(rest)], j)
                return True
    return False


def _reduce_rule(g, node, name, args, info, attrs, fresh, fix_all) -> bool:
    """Reductions over axes other than the channel axis."""
    ids, cdim = info[args[0]]
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
    if ids is None or dims is None:
        return False
    nd = len(_meta(args[0]).shape)
    dims = [d % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if cdim in dims:
        return False
    info[node] = (ids, cdim if keepdim else cdim - sum(1 for d in dims if d < cdim))
    return True


def _layer_norm_rule(g, node, name, args, info, attrs, fresh, fix_all) -> bool:
    """LayerNorm over the (last) channel axis: its weight and bias follow the channels."""
    ids, cdim = info[args[0]]
    shape = args[1] if len(args) > 1 else node.kwargs.get("normalized_shape")
    weight = args[2] if len(args) > 2 else node.kwargs.get("weight")
    bias = args[3] if len(args) > 3 else node.kwargs.get("bias")
    if ids is None or len(shape) != 1 or cdim != len(_meta(node).shape) - 1:
        return False
    for param in (weight, bias):
        if param is not None:
            if param not in attrs:
                return False
            g.add_param(attrs[param], 0, ids)
    owner = attrs[weight].rpartition(".")[0] if weight in attrs else None
    if owner is not None:
        g.norms[owner] = ids
        g.module_channels[owner] = (ids, ids)
    info[node] = (ids, cdim)
    return True


_SHAPE_RULES = {"pad": _pad_rule, "getitem": _getitem_rule, "flatten": _flatten_rule, "permute": _permute_rule,
                "transpose": _permute_rule, "view": _view_rule, "reshape": _view_rule, "mean": _reduce_rule,
                "sum": _reduce_rule, "amax": _reduce_rule, "amin": _reduce_rule, "layer_norm": _layer_norm_rule}
# Shape ops whose output has untracked channels when their input has (the others then mark the node unknown).
_UNTRACKED_STAYS_UNTRACKED = {"getitem", "flatten", "permute", "transpose", "view", "reshape"}


def _elementwise(g: ChannelGraph, node, info, attrs, fix_all) -> None:
    """Broadcasting element-wise op: merge the ids of the channels it combines."""
    uf = g.uf
    out = _meta(node)
    nd = len(out.shape)
    operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)]
    carriers = [a for a in operands if a in info and info[a][0] is not None]
    if not carriers:
        for a in operands:
            if a in info:
                fix_all(info[a][0])
        info[node] = (None, None)
        return
    lead = carriers[0]
    ids, cdim = info[lead]
    out_cdim = cdim + nd - len(_meta(lead).shape)
    if out.shape[out_cdim] != len(ids):
        for a in carriers:
            fix_all(info[a][0])
        info[node] = (None, None)
        return
    for a in operands:
        if a is lead:
            continue
        if a in attrs:
            shape = _attr_shape(g, node, a)
            if shape is None:
                fix_all(ids)
                continue
            dim = out_cdim - (nd - len(shape))
            if 0 <= dim < len(shape) and shape[dim] == len(ids) and len(ids) > 1:
                g.add_param(attrs[a], dim, ids)
            continue
        a_meta = _meta(a)
        if a_meta is None:
            continue
        dim = out_cdim - (nd - len(a_meta.shape))
        size = a_meta.shape[dim] if 0 <= dim < len(a_meta.shape) else 1
        a_ids, a_cdim = info.get(a, (None, None))
        if size == 1 and (a_ids is None or a_cdim != dim):
            if a_ids is not None:
                fix_all(a_ids)  # its channels broadcast over ours: keep them
            continue
        if a_ids is not None and a_cdim == dim and len(a_ids) == len(ids):
            for x, y in zip(ids, a_ids):
                uf.union(x, y)
        else:
            fix_all(ids)
            fix_all(a_ids)
    info[node] = (ids, out_cdim)


def _attr_shape(g: ChannelGraph, node, attr_node) -> tuple[int, ...] | None:
    meta = _meta(attr_node)
    if meta is not None:
        return tuple(meta.shape)
    root = attr_node.graph.owning_module
    try:
        value = root.get_parameter(str(attr_node.target))
    except AttributeError:
        try:
            value = root.get_buffer(str(attr_node.target))
        except AttributeError:
            return None
    return tuple(value.shape)
