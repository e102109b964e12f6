"""Finding the k x k convolutions of a model and extracting their 2-D filters.

A layer's weight W has shape (C_out, C_in/groups, k, k); its filters are the rows of the
N x k^2 matrix F = W.reshape(C_out * C_in/groups, k * k), N = C_out * C_in/groups, in the
order of torch's memory layout (output channel major). Depthwise and grouped convolutions
are included.

Depth: every ``nn.Conv2d`` of the model (any kernel size) gets a conv index in module
registration order (``model.named_modules()``, which for the zoo is the forward order), and a
normalised depth index / (number of convolutions - 1), 0 for a model with one convolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from convforge.errors import ConvforgeError


@dataclass(frozen=True)
class ConvLayer:
    """Where a k x k convolution sits in its model and what shape it has."""

    name: str
    conv_index: int
    depth: float
    in_channels: int
    out_channels: int
    groups: int
    kernel: int
    stride: int
    dilation: int

    @property
    def n_filters(self) -> int:
        return self.out_channels * (self.in_channels // self.groups)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel / DataParallel / torch.compile wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else None)
        if inner is None:
            break
        model = inner
    return model


def conv_layers(model: nn.Module, kernel: int = 3) -> list[tuple[ConvLayer, nn.Conv2d]]:
    """The model's 2-D convolutions with a square ``kernel`` x ``kernel`` weight, with their depth."""
    if kernel < 1:
        raise ConvforgeError(f"--kernel must be >= 1, got {kernel}")
    model = unwrap(model)
    convs = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "weight", None), torch.Tensor)
             and not isinstance(m.weight, nn.parameter.UninitializedParameter) and m.weight.dim() == 4]
    total = len(convs)
    found = []
    for index, (name, conv) in enumerate(convs):
        if tuple(conv.weight.shape[2:]) != (kernel, kernel):
            continue
        info = ConvLayer(
            name=name or "(root)", conv_index=index, depth=index / (total - 1) if total > 1 else 0.0,
            in_channels=int(conv.in_channels), out_channels=int(conv.out_channels), groups=int(conv.groups),
            kernel=kernel, stride=int(conv.stride[0]), dilation=int(conv.dilation[0]),
        )
        found.append((info, conv))
    return found


def layer_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The detached float32 CPU weight (C_out, C_in/groups, k, k)."""
    return conv.weight.detach().to("cpu", torch.float32)


@dataclass
class Filters:
    """All k x k filters of a model: ``filters`` (N, k^2) float32, ``layer`` (N,) index into ``layers``."""

    filters: np.ndarray
    layer: np.ndarray
    layers: list[ConvLayer]
    kernel: int

    def __len__(self) -> int:
        return int(self.filters.shape[0])

    def of_layer(self, index: int) -> np.ndarray:
        starts = np.concatenate([[0], np.cumsum([info.n_filters for info in self.layers])])
        return self.filters[starts[index]:starts[index + 1]]


def extract_filters(model: nn.Module, kernel: int = 3) -> Filters:
    """Every k x k filter of every k x k convolution of ``model``, stacked in layer order.

    Raises ConvforgeError if the model has no such convolution.
    """
    layers = conv_layers(model, kernel)
    if not layers:
        raise ConvforgeError(f"the model has no 2-D convolution with a {kernel}x{kernel} kernel; "
                             f"pick another --kernel (e.g. 1, 3, 5, 7)")
    total = sum(info.n_filters for info, _ in layers)
    filters = np.empty((total, kernel * kernel), dtype=np.float32)
    owner = np.empty(total, dtype=np.int32)
    out = torch.from_numpy(filters)
    start = 0
    for index, (info, conv) in enumerate(layers):
        n = info.n_filters
        out[start:start + n].copy_(conv.weight.detach().reshape(n, kernel * kernel))
        owner[start:start + n] = index
        start += n
    return Filters(filters=filters, layer=owner, layers=[info for info, _ in layers], kernel=kernel)
