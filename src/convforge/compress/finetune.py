"""The training runs of ``convforge prune``: the optional regularised phase before pruning and the
fine-tune after each prune step, each one run (or resumed, or reused) on the training engine in its
own folder of the command's work directory."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.nn as nn

from convforge.compress.pruning import PruneResult
from convforge.config import TrainConfig
from convforge.errors import ConfigError
from convforge.fileio import atomic_write_json
from convforge.train.callbacks import Callback
from convforge.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

Log = Callable[[str], None]
SAFETENSORS = ".safetensors"
SPARSITY_RUN = "sparsity"  # the regularised phase's folder in the work directory


def default_work_dir(out_path: Path) -> Path:
    """The folder of the fine-tuning runs of output ``out_path``: ``OUT.finetune/`` next to it."""
    name = out_path.name[:-len(SAFETENSORS)] if out_path.name.endswith(SAFETENSORS) else out_path.name
    return out_path.with_name(f"{name}.finetune")


def epochs_per_step(finetune_epochs: float, steps: int) -> int:
    """The whole number of epochs each of ``steps`` fine-tunes trains (the engine trains whole epochs)."""
    per_step = finetune_epochs / steps
    if per_step < 1 or not math.isclose(per_step, round(per_step), abs_tol=1e-9):
        whole = max(1, round(per_step)) * steps
        raise ConfigError(f"--finetune-epochs {finetune_epochs:g} over --steps {steps} is {per_step:g} epochs per "
                          f"step, but fine-tuning trains whole epochs: give --finetune-epochs a multiple of --steps "
                          f"(e.g. --finetune-epochs {whole}) or change --steps")
    return round(per_step)


@dataclass
class FineTuner:
    """Runs (or resumes) the training runs of one prune command on the training engine, in ``work_dir``:
    ``sparsity/`` (the regularised phase) and ``step-K/`` (the fine-tune after prune step K).

    The recipe is ``convforge prune``'s: SGD (Nesterov, momentum 0.9, weight decay 5e-4), cosine from
    ``lr`` without warm-up, the data's default augmentation and crop padding (size / 8);
    ``keep_sparsity`` holds the pruned zeros at zero (global magnitude). ``epochs``: of each step's fine-tune
    (0: the steps are not fine-tuned). ``teacher``: a checkpoint the fine-tunes distil from (the engine's
    ``--teacher``: soft targets at its default weight and temperature); the regularised phase never does.
    """

    work_dir: Path
    data: str
    epochs: int
    lr: float
    batch_size: int
    image_size: int | None
    keep_sparsity: bool
    seed: int = 0
    amp: bool = False
    channels_last: bool = False
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False
    teacher: str | None = None

    def check_work_dir(self, signature: dict[str, Any]) -> None:
        """Start ``work_dir`` for this command, or check that the runs it holds are this command's."""
        file = self.work_dir / "prune.json"
        if file.is_file():
            saved = json.loads(file.read_text())
            differ = sorted(k for k in signature.keys() | saved.keys() if saved.get(k) != signature.get(k))
            if differ:
                raise ConfigError(
                    f"{self.work_dir} holds the fine-tuning runs of another prune command (different "
                    f"{', '.join(differ)}): delete that folder to start over, or choose another --out")
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(file, signature)

    def saved_step(self, step: int) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]] | None:
        """The report entry, plan and notes of step ``step`` when an earlier try already pruned it."""
        file = self.work_dir / f"step-{step}.state.json"
        if not file.is_file() or not self.pruned_path(step).is_file():
            return None
        state = json.loads(file.read_text())
        return state["entry"], state["plan"], state["notes"]

    def save_step(self, step: int, model: nn.Module, meta: dict[str, Any], entry: dict[str, Any],
                  result: PruneResult) -> None:
        """Keep step ``step``'s pruned checkpoint (the fine-tune's ``init``) and its report entry."""
        save_checkpoint(self.pruned_path(step), model, meta)
        atomic_write_json(self.work_dir / f"step-{step}.state.json",
                          {"entry": entry, "plan": result.plan, "notes": result.notes})

    def pruned_path(self, step: int) -> Path:
        """Step ``step``'s pruned checkpoint, before fine-tuning."""
        return self.work_dir / f"step-{step}.pruned.safetensors"

    def run(self, step: int, init: Path, log: Log) -> tuple[Checkpoint, dict[str, Any]]:
        """Fine-tune the pruned checkpoint ``init`` of step ``step``; the tuned checkpoint and what it cost."""
        return self.run_phase(f"step-{step}", init, self.epochs, self.seed + step, log, teacher=self.teacher)

    def run_phase(self, name: str, init: Path, epochs: int, seed: int, log: Log,
                  callbacks: Sequence[Callback] = (), teacher: str | None = None) -> tuple[Checkpoint, dict[str, Any]]:
        """Train ``init`` for ``epochs`` in ``work_dir/name`` with ``callbacks`` (and distillation from
        ``teacher``), or resume an interrupted try, or reuse a finished one; the trained checkpoint and what
        the run cost."""
        from convforge.train import engine

        run_dir = self.work_dir / name
        done = self._completed(run_dir)
        if done is not None:
            log(f"  {name}: reusing the finished run {run_dir}")
            summary = done
        elif (run_dir / "resume.safetensors").is_file():
            log(f"  {name}: resuming the interrupted run {run_dir}")
            summary = engine.train(TrainConfig(resume=str(run_dir), device=self.device, threads=self.threads),
                                   callbacks=callbacks, quiet=self.quiet)
        else:
            log(f"  {name}: {epochs} epoch(s) in {run_dir}")
            config = self._config(init, run_dir, epochs, seed, teacher)
            summary = engine.train(config, callbacks=callbacks, quiet=self.quiet)
        tuned = load_checkpoint(run_dir / "last.safetensors")
        info = {"steps": self._optimizer_steps(tuned, epochs), "epochs": epochs, "lr": self.lr,
                "batch_size": self.batch_size, "amp": self.amp, "channels_last": self.channels_last,
                "seconds": summary.get("train_time_s", 0.0), "run_dir": str(run_dir), "teacher": teacher}
        return tuned, info

    def _config(self, init: Path, run_dir: Path, epochs: int, seed: int, teacher: str | None) -> TrainConfig:
        return TrainConfig(init=str(init), keep_sparsity=self.keep_sparsity, data=self.data, epochs=epochs,
                           lr=self.lr, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                           schedule="cosine", warmup_epochs=0, batch_size=self.batch_size,
                           image_size=self.image_size, amp=self.amp, channels_last=self.channels_last,
                           seed=seed, device=self.device, threads=self.threads,
                           eval_every=epochs, out=str(run_dir), teachers=[teacher] if teacher else [])

    @staticmethod
    def _completed(run_dir: Path) -> dict[str, Any] | None:
        summary = run_dir / "summary.json"
        if not summary.is_file() or not (run_dir / "last.safetensors").is_file():
            return None
        try:
            result = json.loads(summary.read_text())
        except (OSError, ValueError):
            return None
        return result if result.get("status") == "completed" else None

    def _optimizer_steps(self, tuned: Checkpoint, epochs: int) -> int:
        train = tuned.meta.get("data", {}).get("train")
        return int(train // self.batch_size * epochs) if isinstance(train, int) else 0
