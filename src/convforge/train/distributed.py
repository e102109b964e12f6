"""Distributed data-parallel training under torchrun: process group, collectives, synchronised BatchNorm.

A run on N processes with batch b per process takes the same steps as one process with batch
N*b: the sampler gives each rank an interleaved share of every global batch (data/loader.py),
DistributedDataParallel averages the gradients, and with ``sync_bn`` the BatchNorm statistics
are computed over the global batch.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from convforge.collectives import all_reduce_sum, is_distributed  # noqa: F401 - all_reduce_sum: the engine takes it from here
from convforge.errors import ConfigError
from convforge.train.rundir import ProcessRole

BARRIER_REPORT_S = 60.0  # seconds between two messages of a process waiting at barrier()
_barriers = 0  # barrier() calls so far: every process makes the same calls, so the count names each one

def init_distributed(role: ProcessRole, device: torch.device, timeout_s: float) -> bool:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); False for a single process."""
    if role.world_size <= 1:
        return False
    if is_distributed():
        return True
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError(
            f"WORLD_SIZE={role.world_size} but MASTER_ADDR/MASTER_PORT are not set: start distributed runs "
            "with `convforge train --nproc-per-node N ...` or `torchrun --nproc-per-node N -m convforge train ...`"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, rank=role.rank, world_size=role.world_size, timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return True


def shutdown_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier(report_s: float = BARRIER_REPORT_S) -> None:
    """Wait for every process, with no deadline: arrivals are counted in the process group's key-value store
    and polled (a message on stderr every ``report_s`` seconds), so a long wait such as rank 0 building an
    image store never meets the collective time-out (--dist-timeout); a collective barrier follows at once."""
    global _barriers
    if not is_distributed():
        return
    store = _default_store()
    if store is not None:
        _barriers += 1
        key, world = f"convforge/barrier/{_barriers}", dist.get_world_size()
        store.add(key, 1)
        started = time.monotonic()
        next_report = report_s
        while store.add(key, 0) < world:
            time.sleep(0.2)
            if time.monotonic() - started >= next_report:
                print(f"rank {dist.get_rank()}: waiting for the other processes (e.g. rank 0 building the data) "
                      f"for {next_report:.0f} s", file=sys.stderr, flush=True)
                next_report += report_s
    dist.barrier()


def _default_store() -> Any:
    """The process group's key-value store (None where this torch does not expose it)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every process (one tiny all-reduce)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over all processes' batches.

    torch.nn.SyncBatchNorm supports GPUs only; this one runs on any backend (gloo on CPU). The
    per-channel sums are all-reduced with an autograd-aware collective, so the gradient is the
    gradient of global-batch BatchNorm. Running statistics are updated exactly like BatchNorm2d
    (unbiased variance of the global batch), so a 2 x 32 run matches a 1 x 64 run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = dist_fn.all_reduce(stats, op=dist.ReduceOp.SUM)
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels:2 * channels] / total - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by a synchronised one (torch's SyncBatchNorm on CUDA, ours elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = DistributedBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                                 child.track_running_stats, device=child.weight.device
                                                 if child.affine else None)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            convert_sync_batchnorm(child, device)
    return model
