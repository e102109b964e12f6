"""The training engine: ``train(config)`` is what ``convforge train`` runs.

A run is a short sequence of named steps: :func:`convforge.train.setup.set_up` (config, process,
data, model, optimizer, loader, resume state, banner), then per epoch :func:`run_epoch` (the
training steps, :func:`train_step`) and :func:`end_epoch` (evaluation, callbacks, checkpoints),
then :func:`finish` (summary.json). What differs between tasks comes from the task's hooks
(:mod:`convforge.train.tasks`); what is optional (TensorBoard, filter health, the report, a
user's code) comes in as callbacks (:mod:`convforge.train.callbacks`).
"""

from __future__ import annotations

import errno
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from convforge.config import TrainConfig
from convforge.errors import DiskFullError, NonFiniteLossError
from convforge.faults import fault_point
from convforge.progress import EpochBar
from convforge.train.callbacks import Callback, CallbackList, EpochEndHook
from convforge.train.checkpoint import save_checkpoint
from convforge.train.distributed import all_ranks_agree, all_reduce_sum, shutdown_distributed
from convforge.train.optim import lr_at
from convforge.train.qat import quantization_meta
from convforge.train.qat import start_epoch as start_quantized_epoch
from convforge.train.rundir import ProcessRole
from convforge.train.setup import set_up
from convforge.train.state import TrainingState
from convforge.train.tasks import Step, Task, get_task

EpochCallback = Callable[[int, dict[str, Any]], None]
MAX_SKIPS_IN_A_ROW = 20


class TrainingInterrupted(Exception):
    """Raised (from a signal handler or KeyboardInterrupt) to stop a run after saving its state."""

    def __init__(self, exit_code: int = 130) -> None:
        super().__init__(f"training interrupted (exit code {exit_code})")
        self.exit_code = exit_code


def train(
    config: TrainConfig | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    on_epoch_end: EpochCallback | None = None,
    role: ProcessRole | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train a model as ``config`` says and return the run's summary (also written to summary.json).

    ``callbacks`` run at the points :mod:`convforge.train.callbacks` lists; ``on_epoch_end(epoch,
    record)`` is called after each epoch's checkpoint is written. No callback is added here:
    ``convforge.fit`` adds the ones the config asks for (TensorBoard, filter health, report).
    A full disk raises :class:`DiskFullError`; every file written before stays intact.
    """
    hooks = CallbackList([*callbacks, *([EpochEndHook(on_epoch_end)] if on_epoch_end is not None else [])])
    try:
        return _train(config, hooks, role, quiet)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(_disk_full_message(exc, config)) from None
    finally:
        shutdown_distributed()


def _disk_full_message(exc: OSError, config: TrainConfig | None) -> str:
    where = Path(config.resume or config.out or ".") if config else Path(".")
    intact = [p.name for p in (where / "last.safetensors", where / "resume.safetensors") if p.exists()]
    kept = (f"the files written before are intact ({', '.join(intact)} in {where}); after freeing space, "
            f"resume with: convforge train --resume {where}") if intact else "no checkpoint had been written yet"
    return f"disk full ({exc.strerror}) while writing {exc.filename or 'a file'}: {kept}"


def _train(config: TrainConfig | None, hooks: CallbackList, role: ProcessRole | None, quiet: bool) -> dict[str, Any]:
    state = set_up(config, role, quiet)
    try:
        hooks.on_start(state)
        train_epochs(state, hooks)
        return finish(state, hooks)
    finally:
        hooks.close(state)


def train_epochs(state: TrainingState, hooks: Callback) -> None:
    """Every remaining epoch; an interrupt saves the state, a non-finite loss marks the run diverged."""
    try:
        for epoch in range(state.start_epoch, state.cfg.epochs):
            run_epoch(state, epoch)
            end_epoch(state, hooks)
    except (KeyboardInterrupt, TrainingInterrupted) as exc:
        _save_interrupted(state)
        raise TrainingInterrupted(exc.exit_code if isinstance(exc, TrainingInterrupted) else 130) from None
    except NonFiniteLossError as exc:
        state.run.log(str(exc))
        state.run.write_json("summary.json", {"status": "diverged", "error": str(exc), "run_dir": str(state.run.path)})
        raise


def _save_interrupted(state: TrainingState) -> None:
    """Save the state of an epoch stopped mid-way (an epoch's end has saved its own) and say how to resume."""
    if 0 < state.batch_index < state.steps_per_epoch and state.sums:
        state.sums["time"] += time.perf_counter() - state.epoch_start
        state.save_state(state.epoch, state.batch_index, state.sums)
    state.log(f"interrupted at epoch {state.epoch + 1}, batch {state.batch_index}; state saved. "
              f"Resume with: convforge train --resume {state.run.path}")


def run_epoch(state: TrainingState, epoch: int) -> None:
    """Train one epoch (from the saved batch on the first epoch of a resumed run) and sum its statistics."""
    cfg, role = state.cfg, state.role
    resumed = epoch == state.start_epoch and state.start_batch
    state.epoch = epoch
    state.model.train()
    start_quantized_epoch(state.model, cfg, epoch)  # --qat: BatchNorm statistics frozen late in training
    state.loader.set_epoch(epoch)
    state.sums = {"loss": 0.0, **{k: 0.0 for k in state.task.stat_keys}, "seen": 0.0, "time": 0.0}
    if resumed and role.is_main:
        state.sums.update(state.partial)  # the saved partial sums are global: restore them once
    state.epoch_start = time.perf_counter()
    state.seen_this_session = 0
    state.batch_index = state.start_batch if resumed else 0
    with EpochBar(f"epoch {epoch + 1}/{cfg.epochs}", state.steps_per_epoch, enabled=role.is_main and not state.quiet) as bar:
        for x, y in state.loader.iter_from(state.batch_index):
            if not train_step(state, x, y):
                continue
            elapsed = time.perf_counter() - state.epoch_start
            sums = state.sums
            bar.update(state.batch_index, sums["loss"] / sums["seen"], state.task.progress_value(sums),
                       state.seen_this_session / max(elapsed, 1e-9))
            if (cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0
                    and state.batch_index < state.steps_per_epoch):
                state.save_state(epoch, state.batch_index, {**_global_sums(sums, state.task), "time": sums["time"] + elapsed})
    state.sums = {**state.sums, **_global_sums(state.sums, state.task)}


def train_step(state: TrainingState, x: torch.Tensor, y: Any) -> bool:
    """One optimizer step on batch ``(x, y)``; False when the batch was skipped (--nan-policy skip-batch)."""
    cfg, task, optimizer = state.cfg, state.task, state.optimizer
    state.lr = lr_at(state.global_step, state.total_steps, state.warmup_steps, cfg.lr, cfg.schedule)
    for group in optimizer.param_groups:
        group["lr"] = state.lr * group.get("lr_scale", 1.0)
    step = Step(cfg, state.data, state.epoch, state.batch_index, state.role.rank, state.loader, state.extras, x,
                model=state.model, forward=state.forward)
    inputs, target = task.prepare_batch(x, y, step)
    with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        output = state.forward(inputs)
        loss = task.training_loss(output, target, inputs, step)
    if (cfg.nan_policy == "stop" and state.global_step % state.check_every == 0
            and not all_ranks_agree(bool(torch.isfinite(loss)), state.device)):
        raise NonFiniteLossError(_nonfinite_message(float(loss.detach()), state))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.nan_policy == "skip-batch" and not all_ranks_agree(_loss_and_grads_finite(loss, state.model), state.device):
        _skip_batch(state, loss)
        return False
    state.skipped_in_a_row = 0
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    optimizer.step()
    if state.hold_zeros is not None:
        state.hold_zeros()
    if state.ema is not None:
        state.ema.update(state.model)
    state.global_step += 1
    state.batch_index += 1
    fault_point("step")
    count = y.shape[0]
    state.seen_this_session += count
    sums = state.sums
    sums["loss"] += float(loss.detach()) * count
    for key, value in task.step_stats(output, y).items():
        sums[key] += value
    sums["seen"] += count
    return True


def _skip_batch(state: TrainingState, loss: torch.Tensor) -> None:
    """Drop a batch whose loss or gradient is not finite; too many in a row stop the run."""
    state.sums["skipped"] = state.sums.get("skipped", 0.0) + 1
    state.skipped_in_a_row += 1
    if state.skipped_in_a_row > MAX_SKIPS_IN_A_ROW:
        raise NonFiniteLossError(_nonfinite_message(
            float(loss.detach()), state, f"{state.skipped_in_a_row} batches in a row had a non-finite loss or gradient"))
    state.say(f"warning: non-finite loss or gradient at epoch {state.epoch + 1}, batch {state.batch_index}: "
              f"batch skipped ({state.sums['skipped']:.0f} this epoch)")
    state.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.batch_index += 1


def end_epoch(state: TrainingState, hooks: Callback) -> dict[str, Any]:
    """The epoch's record (training figures, evaluation), callbacks, checkpoints, resume state, epoch line."""
    cfg, sums, epoch = state.cfg, state.sums, state.epoch
    if not sums["seen"]:
        raise NonFiniteLossError(_nonfinite_message(
            math.nan, state, "every batch of the epoch had a non-finite loss or gradient"))
    if not math.isfinite(sums["loss"]):
        raise NonFiniteLossError(_nonfinite_message(sums["loss"], state))
    now = time.perf_counter()
    state.train_seconds += now - state.epoch_start
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": sums["loss"] / sums["seen"],
        **state.task.epoch_stats(sums),
        **(state.loader.epoch_record() if hasattr(state.loader, "epoch_record") else {}),  # e.g. train_size
        "lr": state.lr,
        "images_per_s": state.seen_this_session / max(now - state.epoch_start, 1e-9),
        "train_time_s": sums["time"] + now - state.epoch_start,
    }
    if cfg.nan_policy == "skip-batch":
        record["skipped_batches"] = int(sums.get("skipped", 0))
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        evaluate_epoch(state, record)
    hooks.on_epoch_end(state, record)
    record["elapsed_s"] = time.perf_counter() - state.started
    state.run.append_record(record)
    save_checkpoints(state, record)
    state.save_state(epoch + 1, 0, {})
    state.log(epoch_line(record, cfg.epochs, state.eval_splits, state.task))
    hooks.on_epoch_saved(state, record)
    return record


def evaluate_epoch(state: TrainingState, record: dict[str, Any]) -> None:
    """Evaluate the model (the EMA weights with --ema) on every evaluation split into ``record``."""
    fault_point("eval")
    eval_start = time.perf_counter()
    for split in state.eval_splits:
        result = state.task.evaluate(state.eval_model, state.data, split, state.cfg, state.device,
                                     state.role.rank, state.role.world_size)
        record.update({f"{split}_{key}": value for key, value in result.items()})
    record["eval_time_s"] = time.perf_counter() - eval_start


def save_checkpoints(state: TrainingState, record: dict[str, Any]) -> None:
    """last.safetensors every epoch; best.safetensors when the selecting metric improved (rank 0 writes)."""
    prefixes = ("train_", *(f"{name}_" for name in state.eval_splits))
    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k.startswith(prefixes)}
    meta = checkpoint_meta(state.cfg, state.data, state.model_args, metrics, record["epoch"], state.task,
                           state.input_size)
    if state.init is not None:
        meta.update(state.init.meta)
    meta.update(quantization_meta(state.cfg, state.eval_model))
    if state.is_main:
        save_checkpoint(state.run.file("last.safetensors"), state.eval_model, meta)
        if state.select_key in record and record[state.select_key] > state.best["score"]:
            state.best = {"score": record[state.select_key], "epoch": record["epoch"]}
            save_checkpoint(state.run.file("best.safetensors"), state.eval_model, meta)


def checkpoint_meta(cfg: TrainConfig, data: Any, model_args: dict, metrics: dict, epoch: int,
                    task: Task | None = None, input_size: tuple[int, ...] | None = None) -> dict[str, Any]:
    """What a checkpoint says about itself: task facts, model, classes, inputs, data, metrics, recipe."""
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "resume", "cache_dir", "device", "threads", "dist_timeout")}
    task = task or get_task("classify")
    return {
        "task": task.name,
        "model": {"name": cfg.model, "args": model_args, "num_classes": data.num_classes, "in_chans": data.channels},
        "classes": list(getattr(data, "classes", [])),
        "input_size": list(input_size or (data.channels, *data.image_size)),
        **task.meta(data),  # after input_size: a task may record another inference input (e.g. FixRes's)
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "data": {"spec": data.spec, "train": len(data.train),
                 "test": len(data.test) if getattr(data, "test", None) is not None else 0},
        "weights": "ema" if cfg.ema else "lookahead" if cfg.lookahead else "trained",
        "epoch": epoch,
        "metrics": metrics,
        "recipe": recipe,
    }


def finish(state: TrainingState, hooks: Callback) -> dict[str, Any]:
    """summary.json of the completed run, the callbacks' on_end, and the last log line."""
    cfg, run, task, best = state.cfg, state.run, state.task, state.best
    final = run.records[-1]
    summary = {
        "status": "completed", "run_dir": str(run.path), "model": cfg.model, "data": cfg.data, "epochs": cfg.epochs,
        "task": task.name,
        **task.summary_fields(final, best),
        "metrics": {k: v for k, v in final.items() if k.startswith(tuple(f"{name}_" for name in state.eval_splits))
                    and isinstance(v, (int, float))},
        "best_epoch": best["epoch"],
        "best_score": best["score"],
        "best_selected_on": state.select_on,
        "best_metric": state.select_key,
        "params": state.params,
        "macs": state.macs,
        "train_time_s": state.train_seconds,
        "wall_time_s": time.perf_counter() - state.started,
        "images_per_s": (state.steps_per_epoch * cfg.batch_size * state.role.world_size * cfg.epochs
                         / max(state.train_seconds, 1e-9)),
        "device": str(state.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "checkpoints": {"best": str(run.file("best.safetensors")), "last": str(run.file("last.safetensors"))},
    }
    run.write_json("summary.json", summary)
    hooks.on_end(state, summary)
    run.log(task.done_text(final, state.select_key, summary["wall_time_s"]))
    return summary


def epoch_line(record: dict[str, Any], epochs: int, eval_splits: list[str], task: Task) -> str:
    """``epoch 3/10  loss 0.4321  <the task's figures>  lr 0.05  1234 img/s  12.3 s``."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train_loss']:.4f}",
             *task.epoch_text(record, eval_splits),
             f"lr {record['lr']:.3g}", f"{record['images_per_s']:.0f} img/s", f"{record['elapsed_s']:.1f} s"]
    return "  ".join(parts)


def _global_sums(sums: dict[str, float], task: Task) -> dict[str, float]:
    """The epoch's running sums over all processes (the same dict on one process)."""
    keys = ("loss", *task.stat_keys, "seen", "skipped")
    values = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64)
    all_reduce_sum(values)
    return dict(zip(keys, values.tolist()))


def _loss_and_grads_finite(loss: torch.Tensor, model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not torch.isfinite(loss):
        return False
    return bool(torch.isfinite(torch.stack([g.abs().amax() for g in grads]).amax())) if grads else True


def _nonfinite_message(value: float, state: TrainingState, what: str = "") -> str:
    """Why training stopped, where the last good checkpoint is, and what to try (``what`` replaces the loss part)."""
    last = state.run.file("last.safetensors")
    kept = f"the last good checkpoint is {last}" if last.exists() else "no epoch had finished, so no checkpoint was written"
    skip_hint = "" if what else ", or --nan-policy skip-batch to skip such batches"
    what = what or f"loss became {value}"
    lr = state.lr
    return (f"{what} at epoch {state.epoch + 1}, batch {state.batch_index} (lr {lr:.3g}); training stopped and {kept}. "
            f"Try a lower learning rate (e.g. --lr {lr / 10:.3g}) or --grad-clip 1.0{skip_hint}.")
