"""The collectives evaluation code needs under torchrun (a no-op on one process), below every other layer."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU under nccl, else the CPU (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all processes (in place; returned for convenience). No-op on one process."""
    if is_distributed():
        reduced = values.to(collective_device())
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        values.copy_(reduced)
    return values
