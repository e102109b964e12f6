"""Module swapping on a model's traced graph, shared by quantization-aware training (train.qat) and binary
networks (train.binary): find the conv -> BatchNorm -> activation patterns of any fx-traceable model,
replace layers, remove folded BatchNorms and insert quantizers on tensors.

The model is traced with torch.fx (as torch.ao's FX graph mode quantization does): the result is a
``torch.fx.GraphModule`` whose state-dict names follow the model's own (``layer1.0.conv1.conv.weight``
for a wrapped ``layer1.0.conv1``; inserted quantizers under ``act_quant.<tensor name>``). The same
model and settings always give the same names, so a checkpoint is rebuilt by repeating the swap.
"""

from __future__ import annotations

import operator
from typing import Callable, Iterable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from convforge.errors import ConfigError

QUANT_CONTAINER = "act_quant"
LAYER_TYPES = (nn.Conv2d, nn.Linear)
# Operations that only move values (a quantized tensor stays on its grid): no second quantizer after them.
_MOVING_MODULES = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Flatten, nn.Dropout)
_MOVING_FUNCTIONS = {torch.flatten, F.max_pool2d, F.adaptive_max_pool2d, F.dropout, operator.getitem}
_MOVING_METHODS = {"flatten", "view", "reshape", "contiguous"}
RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6}


class _LayerTracer(torch.fx.Tracer):
    """Traces into modules that hold convolutions, BatchNorms or linear layers; any other module is a leaf
    (so that e.g. stochastic depth's ``if self.training`` is not frozen into the graph)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*LAYER_TYPES, nn.BatchNorm2d)) or super().is_leaf_module(m, module_qualified_name):
            return True
        return not any(isinstance(sub, (*LAYER_TYPES, nn.BatchNorm2d)) for sub in m.modules())


def trace(model: nn.Module, purpose: str) -> torch.fx.GraphModule:
    """``model`` as a GraphModule (sharing its modules), or a ConfigError naming ``purpose``."""
    tracer = _LayerTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - torch.fx raises many kinds of error on data-dependent code
        raise ConfigError(f"{purpose} needs a model that torch.fx can trace; {type(model).__name__} cannot be "
                          f"traced ({type(exc).__name__}: {str(exc)[:200]})") from None
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def module_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for other nodes)."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def layer_nodes(gm: torch.fx.GraphModule, types: tuple[type, ...] = LAYER_TYPES) -> list[torch.fx.Node]:
    """The nodes calling a layer of ``types`` (Conv2d and Linear by default), in execution order."""
    return [n for n in gm.graph.nodes if isinstance(module_of(gm, n), types)]


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def following_batchnorm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The BatchNorm2d node that alone consumes ``node``'s output (and is called only there), else None."""
    user = _only_user(node)
    if user is None or not isinstance(module_of(gm, user), nn.BatchNorm2d):
        return None
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == user.target)
    return user if calls == 1 and user.args[0] is node else None


def is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """``node`` is a ReLU or ReLU6 (module, function or method)."""
    return (isinstance(module_of(gm, node), (nn.ReLU, nn.ReLU6))
            or (node.op == "call_function" and node.target in RELU_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("relu", "relu_")))


def following_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The ReLU/ReLU6 node that alone consumes ``node``'s output, else None."""
    user = _only_user(node)
    return user if user is not None and is_relu(gm, user) else None


def moves_values_only(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """``node`` only selects, reshapes or max-pools its first input (its output is on the input's grid)."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), _MOVING_MODULES)
    if node.op == "call_function":
        return node.target in _MOVING_FUNCTIONS
    return node.op == "call_method" and node.target in _MOVING_METHODS


def quantized_source(gm: torch.fx.GraphModule, node: torch.fx.Node, quantizer: type) -> bool:
    """``node``'s value comes from a ``quantizer`` module through value-moving operations only."""
    while True:
        if isinstance(module_of(gm, node), quantizer):
            return True
        if not moves_values_only(gm, node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        node = node.args[0]


def replace_module(gm: torch.fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at ``target`` (a dotted path) in place of the module there."""
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def remove_node(node: torch.fx.Node, replacement: torch.fx.Node) -> None:
    """Route ``node``'s users to ``replacement`` and drop ``node`` from the graph."""
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


def insert_after(gm: torch.fx.GraphModule, node: torch.fx.Node, module: nn.Module) -> torch.fx.Node:
    """Call ``module`` (registered as ``act_quant.<node name>``) on ``node``'s output; every other user of
    ``node`` reads the new node instead."""
    target = f"{QUANT_CONTAINER}.{node.name}"
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def replace_calls(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node],
                  make: Callable[[], nn.Module], prefix: str) -> int:
    """Replace each of ``nodes`` (activation calls) by a call of a new module from ``make``; returns how many."""
    count = 0
    for node in list(nodes):
        target = f"{prefix}.{node.name}"
        gm.add_submodule(target, make())
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node.args[0],))
        remove_node(node, new)
        count += 1
    return count


def finish(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Check the edited graph, drop the modules no longer called, regenerate the code."""
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm
