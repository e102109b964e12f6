"""Binary networks on the engine (``--binary weights|activations|weights+activations``, ``--binary-method
xnor|dorefa``).

Every convolution and linear layer except the first and the last (the stem and the classifier stay full
precision, as in XNOR-Net, Bi-Real Net and IR-Net) gets binary weights (:mod:`convforge.layers.binary`);
with ``weights+activations`` it also binarises its input, with ``activations`` only its input (real weights:
the first step of two-step training, ReActNet and Liu et al. 2021, whose checkpoint a ``weights+activations``
run then starts from with ``--init``). A sign after a ReLU would always be +1, so with binary activations
the model's ReLU/ReLU6 activations (modules and ``F.relu`` calls) become Hardtanh, the
activation of BNN (Hubara et al. 2016) and IR-Net's binary ResNet-20. BatchNorm stays a float layer after
each binary convolution (it is the per-channel scale and shift a binary layer needs).

With ``shortcuts`` (``--binary-shortcuts``, binary activations only) the model becomes a Bi-Real network
(Liu et al. 2018): every binary convolution's BatchNorm output is added to the convolution's own real-valued
input (:class:`~convforge.layers.binary.RealShortcut`: averaged when it strides, channels repeated when it
widens). A residual add that already follows such a convolution, and whose other input lies upstream of the
convolution's input (a ResNet block's second convolution), is re-pointed at that input, as Bi-Real's blocks
are; a convolution whose output cannot match its input's shape keeps its graph. The real-valued path then
needs no clipping, so the ReLUs become identities (Bi-Real Net has no activation besides the sign).

With ``react`` (``--binary-react``, with shortcuts) the activations are ReActNet's (Liu et al. 2020): each
binary input is compared with a learnable per-channel threshold (RSign) and the ReLUs become RPReLU
(:class:`~convforge.layers.binary.RPReLU`) instead of identities.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import torch.fx
import torch.nn as nn

from convforge.errors import ConfigError
from convforge.layers.binary import BINARY_METHODS, BINARY_STES, BinaryConv2d, BinaryLinear, RealShortcut, RPReLU
from convforge.train.quant_graph import (finish, following_batchnorm, is_relu, layer_nodes, module_of, replace_calls,
                                         replace_module, trace)

BINARY_MODES = ("weights", "activations", "weights+activations")
DEFAULT_METHOD = "xnor"
DEFAULT_STE = "clipped"
STE_NOTES = {"clipped": "sign, clipped straight-through gradient (|x| < 1)",
             "scaled": "sign, clipped straight-through gradient in units of each channel's standard deviation"}
SOURCES = {"xnor": "Rastegari et al. 2016, XNOR-Net", "dorefa": "Zhou et al. 2016, DoReFa-Net"}
SHORTCUTS_SOURCE = "Liu et al. 2018, Bi-Real Net"
REACT_SOURCE = "Liu et al. 2020, ReActNet"
_ADDS = {operator.add, operator.iadd, torch.add}


def check_binary(cfg: Any) -> None:
    """ConfigError for a bad --binary / --binary-method setting."""
    if cfg.binary in (None, "none"):
        if cfg.binary_method is not None:
            raise ConfigError(f"binary_method {cfg.binary_method!r} is a setting of binary networks: add "
                              f"--binary {'|'.join(BINARY_MODES)}")
        if cfg.binary_shortcuts:
            raise ConfigError("--binary-shortcuts is a setting of binary networks: add --binary weights+activations")
        if cfg.binary_react:
            raise ConfigError("--binary-react is a setting of binary networks: add --binary weights+activations "
                              "--binary-shortcuts")
        if cfg.binary_ste is not None:
            raise ConfigError(f"binary_ste {cfg.binary_ste!r} is a setting of binary activations: add --binary "
                              "weights+activations (or activations)")
        return
    if cfg.binary not in BINARY_MODES:
        raise ConfigError(f"binary must be one of {', '.join(BINARY_MODES)} or none, got {cfg.binary!r}")
    if cfg.binary_shortcuts and not binary_activations(cfg.binary):
        raise ConfigError(f"--binary-shortcuts carry the real values that binary activations discard; with --binary "
                          f"{cfg.binary} the activations are already real: use --binary weights+activations "
                          "(or activations) or drop it")
    if cfg.binary_react and not cfg.binary_shortcuts:
        raise ConfigError("--binary-react's RPReLU is the activation of the real-valued path of Bi-Real shortcuts: "
                          "add --binary-shortcuts (ReActNet's blocks have them)")
    if cfg.binary_method is not None and cfg.binary_method not in BINARY_METHODS:
        raise ConfigError(f"binary_method must be one of {', '.join(BINARY_METHODS)}, got {cfg.binary_method!r}")
    if cfg.binary_ste is not None and cfg.binary_ste not in BINARY_STES:
        raise ConfigError(f"binary_ste must be one of {', '.join(BINARY_STES)}, got {cfg.binary_ste!r}")
    if cfg.binary_ste is not None and not binary_activations(cfg.binary):
        raise ConfigError(f"--binary-ste is the gradient of binary activations; with --binary {cfg.binary} the "
                          "activations are real: use --binary weights+activations (or activations) or drop it")


def resolve_binary(cfg: Any) -> Any:
    """``cfg`` with --binary none as None and the method (and, with binary activations, the gradient) filled in."""
    if cfg.binary in (None, "none"):
        return dataclasses.replace(cfg, binary=None, binary_method=None, binary_shortcuts=False, binary_ste=None,
                                   binary_react=False)
    ste = (cfg.binary_ste or DEFAULT_STE) if binary_activations(cfg.binary) else None
    return dataclasses.replace(cfg, binary_method=cfg.binary_method or DEFAULT_METHOD, binary_ste=ste)


def binary_activations(mode: str | None) -> bool:
    """Mode ``mode`` binarises the layers' inputs."""
    return mode in ("activations", "weights+activations")


def binary_record(mode: str, method: str, model: torch.fx.GraphModule | None = None,
                  shortcuts: bool = False, ste: str | None = None, react: bool = False) -> dict[str, Any]:
    """What a checkpoint says about its binary layers (``model``: the prepared model, for the full-precision
    layer names)."""
    scale = "scale mean|W| per output channel" if method == "xnor" else "scale mean|W| per layer"
    record: dict[str, Any] = {"kind": "binary", "mode": mode, "method": method, "source": SOURCES[method],
                              "weights": "float" if mode == "activations" else f"binary, {scale}",
                              "activations": "sign (+-1)" if binary_activations(mode) else "float"}
    if shortcuts:
        record["shortcuts"] = f"real-valued around every binary convolution ({SHORTCUTS_SOURCE})"
    if react:
        record["react"] = f"RSign thresholds and RPReLU ({REACT_SOURCE})"
    if binary_activations(mode):
        record["ste"] = ste or DEFAULT_STE
    if model is not None:
        inner = {id(sub) for m in model.modules() if isinstance(m, (BinaryConv2d, BinaryLinear)) for sub in m.modules()}
        record["full_precision"] = [name for name, m in model.named_modules()
                                    if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inner]
    return record


def latent_state_dict(model: nn.Module) -> dict[str, Any]:
    """The state of the float model inside a prepared binary ``model``: its real-valued (latent) weights under
    the float model's names (``layer1.0.conv1.conv.weight`` -> ``layer1.0.conv1.weight``). Bi-Real shortcuts
    and the activations that replace ReLUs hold no state; the parameters only a binary network has
    (``--binary-react``'s thresholds and RPReLU) keep their names."""
    wrapped = {name: "conv" if isinstance(module, BinaryConv2d) else "linear"
               for name, module in model.named_modules() if isinstance(module, (BinaryConv2d, BinaryLinear))}
    state = {}
    for key, value in model.state_dict().items():
        parts = key.rsplit(".", 2)  # e.g. layer1.0.conv1 | conv | weight
        unwrapped = len(parts) == 3 and wrapped.get(parts[0]) == parts[1]
        state[f"{parts[0]}.{parts[2]}" if unwrapped else key] = value
    return state


def prepare_binary(model: nn.Module, mode: str, method: str = DEFAULT_METHOD, shortcuts: bool = False,
                   ste: str | None = None, react: bool = False) -> torch.fx.GraphModule:
    """``model`` traced, its inner convolution and linear layers binarised, with Bi-Real ``shortcuts``, the
    activations' straight-through gradient ``ste`` and ReActNet's activations (``react``; see the module
    docstring)."""
    if mode not in BINARY_MODES:
        raise ConfigError(f"binary must be one of {', '.join(BINARY_MODES)}, got {mode!r}")
    if react and not (shortcuts and binary_activations(mode)):
        raise ConfigError("ReActNet's activations (react) need binary activations and Bi-Real shortcuts")
    gm = trace(model, "--binary")
    layers = layer_nodes(gm)
    if len(layers) < 3:
        raise ConfigError(f"--binary keeps the first and last layer in full precision; {type(model).__name__} has "
                          f"{len(layers)} convolution/linear layer(s), so none would be binary")
    activations = binary_activations(mode)
    for node in layers[1:-1]:
        module = module_of(gm, node)
        wrapper = BinaryConv2d if isinstance(module, nn.Conv2d) else BinaryLinear
        replace_module(gm, node.target, wrapper(module, method, binary_input=activations,  # type: ignore[arg-type]
                                                binary_weight=mode != "activations", ste=ste or DEFAULT_STE,
                                                learnable_threshold=react))
    if shortcuts:
        for node in layers[1:-1]:
            if isinstance(module_of(gm, node), BinaryConv2d):
                _add_real_shortcut(gm, node)
        gm.graph.eliminate_dead_code()  # the blocks' own shortcuts, which the re-pointed adds no longer read
    if activations:
        relus = [n for n in gm.graph.nodes if is_relu(gm, n)]
        if react:
            for relu in relus:
                replace_calls(gm, [relu], functools.partial(RPReLU, _channels(gm, relu)), "binary_act")
        else:
            replace_calls(gm, relus, nn.Identity if shortcuts else nn.Hardtanh, "binary_act")
    return finish(gm)


def _channels(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    """The number of channels of ``node``'s output: that of the nearest convolution, linear layer or BatchNorm it
    is computed from (nearest first, not through a Bi-Real shortcut, whose repeat changes the count)."""
    todo, seen = list(node.all_input_nodes), set()
    while todo:
        current = todo.pop(0)
        if current in seen:
            continue
        seen.add(current)
        module = module_of(gm, current)
        if isinstance(module, nn.BatchNorm2d):
            return module.num_features
        if isinstance(module, (nn.Conv2d, BinaryConv2d)):
            return (module.conv if isinstance(module, BinaryConv2d) else module).out_channels
        if isinstance(module, (nn.Linear, BinaryLinear)):
            return (module.linear if isinstance(module, BinaryLinear) else module).out_features
        if not isinstance(module, RealShortcut):
            todo += current.all_input_nodes
    raise ConfigError(f"--binary-react: cannot tell the channels of {node.name} (no convolution or BatchNorm "
                      "before it) for its RPReLU")


def _shortcut_for(conv: nn.Conv2d) -> RealShortcut | None:
    """The parameter-free path that brings ``conv``'s input to its output's shape, or None where none does."""
    k, d, p = conv.kernel_size, conv.dilation, conv.padding
    same = (not isinstance(p, str) and all(k[i] % 2 == 1 and p[i] == d[i] * (k[i] - 1) // 2 for i in range(2)))
    if not (same or p == "same") or conv.stride[0] != conv.stride[1] or conv.out_channels % conv.in_channels:
        return None
    return RealShortcut(conv.stride[0], conv.out_channels // conv.in_channels)


def _upstream(node: torch.fx.Node, target: torch.fx.Node) -> bool:
    """``target`` is ``node`` or one of the nodes it is computed from."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current is target:
            return True
        if current not in seen:
            seen.add(current)
            todo += current.all_input_nodes
    return False


def _identity_path(gm: torch.fx.GraphModule, other: torch.fx.Node, source: torch.fx.Node) -> bool:
    """``other`` is a node ``source`` is computed from, or reaches one through parameter-free operations
    only (a ResNet block's identity or option-A shortcut; not a projection convolution)."""
    while not _upstream(source, other):
        module = module_of(gm, other)
        if (module is not None and any(True for _ in module.parameters())) or other.op not in (
                "call_module", "call_function", "call_method") or not other.all_input_nodes:
            return False
        other = other.all_input_nodes[0]
    return True


def _residual_add(gm: torch.fx.GraphModule, out: torch.fx.Node,
                  skip: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node]:
    """The residual add that alone consumes ``out`` (through parameter-free modules such as stochastic
    depth) and the node it adds, or None; ``skip``: a user of ``out`` to ignore."""
    tail = out
    while True:
        users = [user for user in tail.users if user is not skip]
        if len(users) != 1:
            return None, tail
        user = users[0]
        if user.op == "call_function" and user.target in _ADDS:
            return user, tail
        module = module_of(gm, user)
        if module is None or any(True for _ in module.parameters()) or user.args[0] is not tail:
            return None, tail
        tail = user


def _add_real_shortcut(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Add the binary convolution ``node``'s real input to its BatchNorm output (or re-point the residual
    add that follows it at that input); nothing when no parameter-free shortcut fits."""
    shortcut = _shortcut_for(module_of(gm, node).conv)  # type: ignore[union-attr]
    source = node.args[0]
    if shortcut is None or not isinstance(source, torch.fx.Node):
        return
    out = following_batchnorm(gm, node) or node
    gm.add_submodule(f"bireal.{node.name}", shortcut)
    with gm.graph.inserting_after(out):
        real = gm.graph.call_module(f"bireal.{node.name}", (source,))
    residual, tail = _residual_add(gm, out, real)
    other = None if residual is None else next((a for a in residual.args[:2] if a is not tail), None)
    if isinstance(other, torch.fx.Node) and _identity_path(gm, other, source):
        residual.replace_input_with(other, real)  # type: ignore[union-attr]
        return
    with gm.graph.inserting_after(real):
        summed = gm.graph.call_function(operator.add, (out, real))
    out.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not summed)


def describe_binary(cfg: Any) -> str:
    """One line naming the binary mode, method and its source."""
    if not cfg.binary:
        return ""
    acts = "float activations"
    if binary_activations(cfg.binary):
        acts = f"binary activations ({STE_NOTES[cfg.binary_ste or DEFAULT_STE]}"
        relus = (f"RSign thresholds, ReLUs become RPReLU: {REACT_SOURCE}" if cfg.binary_react
                 else "ReLUs become identities")
        acts += (f") with a real-valued shortcut around every binary convolution ({SHORTCUTS_SOURCE}; {relus})"
                 if cfg.binary_shortcuts else "; ReLUs become Hardtanh)")
    weights = ("float weights (binary activations only: the first step of two-step training)"
               if cfg.binary == "activations" else f"{cfg.binary_method} weights ({SOURCES[cfg.binary_method]})")
    return f"binary network: {weights}, {acts}; first and last layer in full precision"
