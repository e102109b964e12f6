"""Folding BatchNorm into the convolution before it, for inference."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite ``conv`` in place so that ``conv(x)`` equals ``bn(conv(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    new_bias = bias * scale + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias)


def module_call_counts(graph: torch.fx.Graph) -> dict[str, int]:
    """How many times each submodule is called in a traced ``graph`` (a reused module is called more than once)."""
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    return uses


def _conv_bn_pairs_by_tracing(model: nn.Module) -> list[tuple[str, str]]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    uses = module_call_counts(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d)
            and len(source.users) == 1
            and uses[source.target] == 1
            and uses[node.target] == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


def _conv_bn_pairs_in_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it and replace the BN by Identity.

    Pairs are found by tracing the forward pass with torch.fx (so attribute pairs such as
    ``conv1``/``bn1`` are found only when the BN really consumes that conv's output); models
    that cannot be traced fall back to adjacent ``Conv2d, BatchNorm2d`` inside ``nn.Sequential``.
    The model is switched to eval mode and changed in place; it is also returned.
    """
    model.eval()
    try:
        pairs = _conv_bn_pairs_by_tracing(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "use the conservative rule"
        pairs = _conv_bn_pairs_in_sequentials(model)
    for conv_name, bn_name in pairs:
        fold_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name))
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    return model
