"""Binary networks on the engine (``--binary weights|weights+activations``, ``--binary-method xnor|dorefa``).

Every convolution and linear layer except the first and the last (the stem and the classifier stay full
precision, as in XNOR-Net, Bi-Real Net and IR-Net) gets binary weights (:mod:`convforge.layers.binary`);
with ``weights+activations`` it also binarises its input. A sign after a ReLU would always be +1, so in
that mode the model's ReLU/ReLU6 activations (modules and ``F.relu`` calls) become Hardtanh, the
activation of BNN (Hubara et al. 2016) and IR-Net's binary ResNet-20. BatchNorm stays a float layer after
each binary convolution (it is the per-channel scale and shift a binary layer needs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx
import torch.nn as nn

from convforge.errors import ConfigError
from convforge.layers.binary import BINARY_METHODS, BinaryConv2d, BinaryLinear
from convforge.train.quant_graph import finish, is_relu, layer_nodes, module_of, replace_calls, replace_module, trace

BINARY_MODES = ("weights", "weights+activations")
DEFAULT_METHOD = "xnor"
SOURCES = {"xnor": "Rastegari et al. 2016, XNOR-Net", "dorefa": "Zhou et al. 2016, DoReFa-Net"}


def check_binary(cfg: Any) -> None:
    """ConfigError for a bad --binary / --binary-method setting."""
    if cfg.binary in (None, "none"):
        if cfg.binary_method is not None:
            raise ConfigError(f"binary_method {cfg.binary_method!r} is a setting of binary networks: add "
                              f"--binary {'|'.join(BINARY_MODES)}")
        return
    if cfg.binary not in BINARY_MODES:
        raise ConfigError(f"binary must be one of {', '.join(BINARY_MODES)} or none, got {cfg.binary!r}")
    if cfg.binary_method is not None and cfg.binary_method not in BINARY_METHODS:
        raise ConfigError(f"binary_method must be one of {', '.join(BINARY_METHODS)}, got {cfg.binary_method!r}")


def resolve_binary(cfg: Any) -> Any:
    """``cfg`` with --binary none as None and the method filled in."""
    if cfg.binary in (None, "none"):
        return dataclasses.replace(cfg, binary=None, binary_method=None)
    return dataclasses.replace(cfg, binary_method=cfg.binary_method or DEFAULT_METHOD)


def binary_record(mode: str, method: str, model: torch.fx.GraphModule | None = None) -> dict[str, Any]:
    """What a checkpoint says about its binary layers (``model``: the prepared model, for the full-precision
    layer names)."""
    record: dict[str, Any] = {"kind": "binary", "mode": mode, "method": method, "source": SOURCES[method],
                              "weights": "binary, " + ("scale mean|W| per output channel" if method == "xnor"
                                                       else "scale mean|W| per layer"),
                              "activations": "sign (+-1)" if mode == "weights+activations" else "float"}
    if model is not None:
        inner = {id(sub) for m in model.modules() if isinstance(m, (BinaryConv2d, BinaryLinear)) for sub in m.modules()}
        record["full_precision"] = [name for name, m in model.named_modules()
                                    if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inner]
    return record


def prepare_binary(model: nn.Module, mode: str, method: str = DEFAULT_METHOD) -> torch.fx.GraphModule:
    """``model`` traced, its inner convolution and linear layers binarised (see the module docstring)."""
    if mode not in BINARY_MODES:
        raise ConfigError(f"binary must be one of {', '.join(BINARY_MODES)}, got {mode!r}")
    gm = trace(model, "--binary")
    layers = layer_nodes(gm)
    if len(layers) < 3:
        raise ConfigError(f"--binary keeps the first and last layer in full precision; {type(model).__name__} has "
                          f"{len(layers)} convolution/linear layer(s), so none would be binary")
    activations = mode == "weights+activations"
    for node in layers[1:-1]:
        module = module_of(gm, node)
        wrapper = BinaryConv2d if isinstance(module, nn.Conv2d) else BinaryLinear
        replace_module(gm, node.target, wrapper(module, method, binary_input=activations))  # type: ignore[arg-type]
    if activations:
        replace_calls(gm, [n for n in gm.graph.nodes if is_relu(gm, n)], nn.Hardtanh, "binary_act")
    return finish(gm)


def describe_binary(cfg: Any) -> str:
    """One line naming the binary mode, method and its source."""
    if not cfg.binary:
        return ""
    acts = ("binary activations (sign, clipped straight-through gradient; ReLUs become Hardtanh)"
            if cfg.binary == "weights+activations" else "float activations")
    return (f"binary network: {cfg.binary_method} weights ({SOURCES[cfg.binary_method]}), {acts}; first and last "
            "layer in full precision")
