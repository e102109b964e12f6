"""The state of one training run, built by the set-up steps, advanced by the loop and given to callbacks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from convforge.train.checkpoint import save_train_state
from convforge.train.rundir import ProcessRole, RunDir


@dataclass
class TrainingState:
    """Everything a run holds. Set-up fills the first group; the loop advances the second.

    Callbacks read it (``state.run.path``, ``state.model``, ``state.epoch``...); they should not
    replace its members.
    """

    cfg: Any  # the resolved TrainConfig
    task: Any  # the convforge.train.tasks.Task
    role: ProcessRole
    device: torch.device
    distributed: bool
    say: Callable[[str], None]
    quiet: bool
    started: float  # time.perf_counter() at the start of train()
    overrides: list[str] = field(default_factory=list)  # options a resume changed
    data: Any = None
    model_args: dict[str, Any] = field(default_factory=dict)
    init: Any = None  # InitWeights of --init, else None
    run: RunDir | None = None
    model: nn.Module | None = None
    forward: nn.Module | None = None  # the model as trained (DDP- and compile-wrapped)
    eval_model: nn.Module | None = None  # the weights evaluated and saved (the EMA copy with --ema)
    optimizer: torch.optim.Optimizer | None = None
    ema: Any = None
    hold_zeros: Callable[[], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # what task.start_training returned
    loader: Any = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    params: int = 0
    macs: int = 0
    input_size: tuple[int, ...] = ()
    eval_splits: list[str] = field(default_factory=list)
    select_on: str = ""
    select_key: str = ""
    check_every: int = 1

    start_epoch: int = 0
    start_batch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"score": -math.inf, "epoch": 0})
    partial: dict[str, float] = field(default_factory=dict)  # saved sums of an epoch stopped mid-way
    train_seconds: float = 0.0
    global_step: int = 0
    epoch: int = 0
    batch_index: int = 0
    lr: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)
    epoch_start: float = 0.0
    seen_this_session: int = 0
    skipped_in_a_row: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.role.is_main

    def log(self, message: str) -> None:
        """Write ``message`` to train.log and show it."""
        self.run.log(message)
        self.say(message)

    def save_state(self, next_epoch: int, next_batch: int, partial_sums: dict[str, float]) -> None:
        """Write resume.safetensors (rank 0): training continues at ``next_epoch``, ``next_batch``."""
        if self.role.is_main:
            extra = {"epoch": next_epoch, "batch": next_batch, "best": self.best, "partial": partial_sums,
                     "world_size": self.role.world_size,
                     "global_step": next_epoch * self.steps_per_epoch + next_batch}
            save_train_state(self.run.file("resume.safetensors"), self.model, self.optimizer, self.ema, extra)
