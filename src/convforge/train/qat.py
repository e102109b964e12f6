"""Quantization-aware training on the engine (``--qat int8``) and the wiring both it and binary networks
(:mod:`convforge.train.binary`) share: preparing the model, the per-epoch BatchNorm freeze, the record a
checkpoint carries, and rebuilding a checkpoint's model from that record.

``--qat int8`` (usually with ``--init CKPT``, a trained float model, and a small learning rate) traces
the model (torch.fx), folds each BatchNorm into the convolution before it, and fake-quantizes
(:mod:`convforge.layers.fake_quant`): per-channel symmetric int8 weights of every convolution and linear
layer; uint8 per-tensor activations (EMA min/max ranges) at the network input, at the output of each
conv-BN(-ReLU/ReLU6) group except the classifier's, and at any other input of a convolution or linear
layer (e.g. after a residual addition or average pooling). From epoch ``ceil(fraction * epochs)`` on
(``--qat-freeze-bn-fraction``, default 0.5) BatchNorm statistics are frozen: the layers train exactly as
the folded int8 inference computes (the whitepaper's recommendation, section 3.2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from convforge.errors import CheckpointError, ConfigError
from convforge.layers.binary import BINARY_STES
from convforge.layers.fake_quant import ActivationFakeQuant, QuantConv2d, QuantLinear
from convforge.train.binary import binary_record, check_binary, describe_binary, prepare_binary, resolve_binary
from convforge.train.quant_graph import (finish, following_batchnorm, following_relu, insert_after, layer_nodes,
                                         module_of, quantized_source, remove_node, replace_module, trace)

QAT_MODES = ("int8",)
DEFAULT_FREEZE_BN_FRACTION = 0.5
META_KEY = "quantization"  # the checkpoint metadata entry that says how the model is quantized


def check_quantization(cfg: Any) -> None:
    """ConfigError for bad --qat / --binary settings or the two together (TrainConfig.validate calls it)."""
    check_binary(cfg)
    if cfg.qat in (None, "none"):
        if cfg.qat_freeze_bn_fraction is not None:
            raise ConfigError("qat_freeze_bn_fraction is a setting of quantization-aware training: add --qat int8")
        return
    if cfg.qat not in QAT_MODES:
        raise ConfigError(f"qat must be one of {', '.join(QAT_MODES)} or none, got {cfg.qat!r}")
    if cfg.qat_freeze_bn_fraction is not None and not 0 <= cfg.qat_freeze_bn_fraction <= 1:
        raise ConfigError(f"qat_freeze_bn_fraction must be in [0, 1] (the share of the epochs after which BatchNorm "
                          f"statistics freeze; 1: never), got {cfg.qat_freeze_bn_fraction}")
    if cfg.binary not in (None, "none"):
        raise ConfigError(f"--qat {cfg.qat} and --binary {cfg.binary} are two kinds of quantization: choose one")


def resolve_quantization(cfg: Any) -> Any:
    """``cfg`` with "none" as None and the unset settings of --qat / --binary filled in; ConfigError when
    --init names a checkpoint that is already quantized (start from its float parent, or --resume its run)."""
    cfg = resolve_binary(cfg)
    if cfg.qat in (None, "none"):
        cfg = dataclasses.replace(cfg, qat=None, qat_freeze_bn_fraction=None)
    elif cfg.qat_freeze_bn_fraction is None:
        cfg = dataclasses.replace(cfg, qat_freeze_bn_fraction=DEFAULT_FREEZE_BN_FRACTION)
    return cfg


def check_init_not_quantized(meta: dict[str, Any], shown: str) -> None:
    """An --init checkpoint must hold a float model or a binary one (whose latent weights are real): a --qat
    checkpoint's BatchNorms are folded into its convolutions."""
    if META_KEY in meta and not (isinstance(meta[META_KEY], dict) and meta[META_KEY].get("kind") == "binary"):
        kind = meta[META_KEY].get("kind", "quantized") if isinstance(meta[META_KEY], dict) else "quantized"
        parent = meta.get("init", {}).get("checkpoint") if isinstance(meta.get("init"), dict) else None
        raise ConfigError(f"--init {shown} is a {kind} checkpoint; start from its float model"
                          + (f" ({parent})" if parent else "") + " or continue its run with --resume RUN_DIR")


def freeze_bn_epoch(cfg: Any) -> int:
    """The first epoch (0-based) trained with frozen BatchNorm statistics (``epochs``: never)."""
    return min(cfg.epochs, math.ceil(cfg.qat_freeze_bn_fraction * cfg.epochs))


def prepare_qat(model: nn.Module) -> torch.fx.GraphModule:
    """``model`` traced, BatchNorms folded into their convolutions, weights and activations fake-quantized
    (see the module docstring). The model's own modules and parameters are reused, not copied."""
    gm = trace(model, "--qat")
    layers = layer_nodes(gm)
    if not layers:
        raise ConfigError(f"--qat: {type(model).__name__} has no Conv2d or Linear layer to quantize")
    for node in layers:
        module = module_of(gm, node)
        if isinstance(module, nn.Conv2d):
            bn = following_batchnorm(gm, node)
            replace_module(gm, node.target, QuantConv2d(module, module_of(gm, bn) if bn is not None else None))
            if bn is not None:
                remove_node(bn, node)
                gm.delete_submodule(bn.target)  # type: ignore[arg-type]  (its module now lives in the QuantConv2d)
        else:
            replace_module(gm, node.target, QuantLinear(module))  # type: ignore[arg-type]
    for node in layers[:-1]:  # the classifier's output (the logits) stays float
        insert_after(gm, following_relu(gm, node) or node, ActivationFakeQuant())
    for node in layers:
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and not quantized_source(gm, source, ActivationFakeQuant):
            insert_after(gm, source, ActivationFakeQuant())
    return finish(gm)


def qat_record(cfg: Any) -> dict[str, Any]:
    """What a QAT checkpoint says about its quantization."""
    return {"kind": "qat", "mode": cfg.qat, "weights": "int8, symmetric per output channel",
            "activations": "uint8, asymmetric per tensor, EMA of batch min/max", "batchnorm": "folded",
            "freeze_bn_epoch": freeze_bn_epoch(cfg), "freeze_bn_fraction": cfg.qat_freeze_bn_fraction}


def quantization_meta(cfg: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """The checkpoint metadata entry of a --qat or --binary run ({} for a float run)."""
    if getattr(cfg, "qat", None):
        return {META_KEY: qat_record(cfg)}
    if getattr(cfg, "binary", None):
        return {META_KEY: binary_record(cfg.binary, cfg.binary_method, model, cfg.binary_shortcuts, cfg.binary_ste,
                                        cfg.binary_react)}
    return {}


def prepare_for_training(model: nn.Module, cfg: Any) -> nn.Module:
    """The model a --qat / --binary run trains (``model`` itself for a float run)."""
    if cfg.qat:
        return prepare_qat(model)
    if cfg.binary:
        return prepare_binary(model, cfg.binary, cfg.binary_method, cfg.binary_shortcuts, cfg.binary_ste,
                              cfg.binary_react)
    return model


def prepare_from_record(model: nn.Module, record: Any, source: str) -> nn.Module:
    """A checkpoint's freshly built ``model`` given the structure its ``quantization`` record names."""
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind == "qat" and record.get("mode") in QAT_MODES:
        return prepare_qat(model)
    if kind == "binary" and record.get("ste") in (None, *BINARY_STES):
        return prepare_binary(model, str(record.get("mode")), str(record.get("method")), "shortcuts" in record,
                              record.get("ste"), "react" in record)
    raise CheckpointError(f"{source}: unknown 'quantization' record {str(record)[:120]}: the metadata is damaged or "
                          "was written by another convforge version")


def start_epoch(model: nn.Module, cfg: Any, epoch: int) -> None:
    """Freeze (or keep training) the BatchNorm statistics of a --qat model for ``epoch`` (0-based)."""
    if not getattr(cfg, "qat", None):
        return
    frozen = epoch >= freeze_bn_epoch(cfg)
    for module in model.modules():
        if isinstance(module, QuantConv2d):
            module.bn_frozen.fill_(frozen)


def describe_quantization(cfg: Any) -> str:
    """One line saying what --qat or --binary does in this run ("" for a float run)."""
    if cfg.qat:
        first = freeze_bn_epoch(cfg)
        frozen = f"frozen from epoch {first + 1} of {cfg.epochs}" if first < cfg.epochs else "never frozen"
        return (f"quantization-aware training: {cfg.qat} (per-channel int8 weights, uint8 EMA-range activations, "
                f"BatchNorm folded, its statistics {frozen})")
    return describe_binary(cfg)
