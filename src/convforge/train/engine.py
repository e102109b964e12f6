"""The training engine: ``train(config)`` is what ``convforge train`` runs."""

from __future__ import annotations

import dataclasses
import errno
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from convforge.config import TrainConfig, dump_yaml, load_yaml
from convforge.data import Dataset
from convforge.errors import CheckpointError, ConfigError, DataError, DiskFullError, NonFiniteLossError
from convforge.faults import fault_point
from convforge.measure import count_macs, count_params
from convforge.progress import EpochBar, echo
from convforge.recipes import apply_recipe
from convforge.train.checkpoint import load_train_state, save_checkpoint, save_train_state
from convforge.train.distill import distillation_loss, load_teachers
from convforge.train.distributed import (
    all_ranks_agree,
    all_reduce_sum,
    barrier,
    broadcast_object,
    convert_sync_batchnorm,
    init_distributed,
    shutdown_distributed,
)
from convforge.train.ema import ModelEma
from convforge.train.mixing import MixedTargets, batch_rng, mix_batch, random_erase
from convforge.train.optim import build_optimizer, lr_at
from convforge.train.rundir import ProcessRole, RunDir, default_run_dir
from convforge.train.tasks import Task, get_task

EpochCallback = Callable[[int, dict[str, Any]], None]


class TrainingInterrupted(Exception):
    """Raised (from a signal handler or KeyboardInterrupt) to stop a run after saving its state."""

    def __init__(self, exit_code: int = 130) -> None:
        super().__init__(f"training interrupted (exit code {exit_code})")
        self.exit_code = exit_code


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def config_for_resume(config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The saved config of ``config.resume``, with any option set differently in ``config`` applied on top."""
    run_dir = Path(config.resume)  # type: ignore[arg-type]
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: no config.yaml there (is it a convforge run directory?)")
    saved = TrainConfig.from_dict(load_yaml(saved_path), str(saved_path))
    defaults = TrainConfig()
    overrides = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("resume", "out"):
            continue
        value = getattr(config, f.name)
        if value != getattr(defaults, f.name) and value != getattr(saved, f.name):
            setattr(saved, f.name, value)
            overrides.append(f"{f.name}={value}")
    saved.resume, saved.out = str(run_dir), str(run_dir)
    saved.explicit_fields = {f.name for f in dataclasses.fields(TrainConfig)}  # type: ignore[attr-defined]
    return saved, overrides


def checkpoint_meta(cfg: TrainConfig, data: Dataset, model_args: dict, metrics: dict, epoch: int,
                    task: Task | None = None, input_size: tuple[int, ...] | None = None) -> dict[str, Any]:
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "resume", "cache_dir", "device", "threads", "dist_timeout")}
    task = task or get_task("classify")
    return {
        "task": task.name,
        **task.meta(data),
        "model": {"name": cfg.model, "args": model_args, "num_classes": data.num_classes, "in_chans": data.channels},
        "classes": list(getattr(data, "classes", [])),
        "input_size": list(input_size or (data.channels, *data.image_size)),
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "data": {"spec": data.spec, "train": len(data.train),
                 "test": len(data.test) if getattr(data, "test", None) is not None else 0},
        "weights": "ema" if cfg.ema else "trained",
        "epoch": epoch,
        "metrics": metrics,
        "recipe": recipe,
    }


def train(
    config: TrainConfig | None = None,
    *,
    on_epoch_end: EpochCallback | None = None,
    role: ProcessRole | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train a model as ``config`` says and return the run's summary (also written to summary.json).

    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is written.
    A full disk raises :class:`DiskFullError`; every file written before stays intact.
    """
    try:
        return _train(config, on_epoch_end=on_epoch_end, role=role, quiet=quiet)
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


def _train(
    config: TrainConfig | None,
    *,
    on_epoch_end: EpochCallback | None,
    role: ProcessRole | None,
    quiet: bool,
) -> dict[str, Any]:
    started = time.perf_counter()
    config = config or TrainConfig()
    overrides: list[str] = []
    if config.resume:
        config, overrides = config_for_resume(config)
    config = apply_recipe(config)
    config.validate()
    if config.init and not config.resume and "data" not in getattr(config, "explicit_fields", set()) \
            and config.data == TrainConfig.data:
        config = _data_of_init(config)
    task = get_task(config.task)
    role = role or ProcessRole.from_env()
    say = (lambda message: None) if quiet or not role.is_main else echo

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if device.type == "cuda" and role.world_size > 1:
        device = torch.device("cuda", role.local_rank)
        torch.cuda.set_device(device)
    distributed = init_distributed(role, device, config.dist_timeout)
    torch.manual_seed(config.seed)

    if not role.is_main:
        barrier()  # rank 0 loads first, so that only it decodes images into the cache
    data = task.load_data(config, say)
    if role.is_main:
        barrier()
    if data.train is None:
        raise DataError(f"{config.data} has no train split to train on (expected a train/ folder)")
    cfg = config.resolved(data.channels, data.image_size, data.default_augment, role.world_size)
    classify = task.name == "classify"
    for note in data.notes:
        say(f"note: {note}")
    model_args = task.model_args(cfg, data)
    init = None
    if cfg.init:
        from convforge.train.init import load_init

        init = load_init(cfg.init, cfg.model, task.name, data, model_args)
        cfg.model, model_args = init.model_name, init.model_args
        cfg.init = init.meta["init"]["checkpoint"]  # absolute: a resume from elsewhere finds it
        data.mean, data.std = init.mean, init.std  # the inputs the weights were trained on
        for note in init.notes:
            say(f"note: {note}")

    run = RunDir(broadcast_object(cfg.out or str(default_run_dir(cfg.model, cfg.data))), role)
    if not cfg.resume and run.file("resume.safetensors").exists():
        raise ConfigError(f"{run.path} already holds a run; resume it with --resume {run.path} or choose another --out")

    try:
        model = init.model if init is not None else task.build_model(cfg, data, model_args)
    except ConfigError as exc:
        if cfg.drop_path is not None and "drop_path_rate" in str(exc):
            raise ConfigError(f"--drop-path: model {cfg.model!r} has no stochastic depth (no drop_path_rate "
                              "argument); leave --drop-path out") from None
        raise
    hold_zeros = _zero_holder(model, say) if cfg.keep_sparsity else None
    if classify and hasattr(model, "init_from_data") and init is None:
        _init_from_data(model, data, cfg.seed)
    teachers = load_teachers(cfg, data.num_classes, data.channels, data.mean, data.std, device)
    student_mean = torch.tensor(list(data.mean), device=device).view(1, -1, 1, 1)
    student_std = torch.tensor(list(data.std), device=device).view(1, -1, 1, 1)
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.random_erasing > 0
    params = count_params(model)
    input_size = task.input_size(data, model)
    macs = count_macs(model, input_size)
    model.to(device)
    if distributed and cfg.sync_bn:
        model = convert_sync_batchnorm(model, device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None

    train_loader = task.train_loader(data, cfg, model, device, role.rank, role.world_size)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch size {cfg.batch_size} x {role.world_size} process(es) is larger than the "
            f"{len(data.train)} training images; lower --batch-size"
        )
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    start_epoch, start_batch, best = 0, 0, {"score": -math.inf, "epoch": 0}
    partial: dict[str, float] = {}
    if cfg.resume and not run.file("resume.safetensors").exists():
        say(f"note: {run.path} has no saved state yet (the run stopped before its first save); "
            "starting it from the beginning")
    elif cfg.resume:
        extra = load_train_state(run.file("resume.safetensors"), model, optimizer, ema)
        start_epoch, start_batch, best, partial = extra["epoch"], extra["batch"], extra["best"], extra["partial"]
        if "score" not in best:  # a run saved before tasks existed
            best = {"score": best.get("top1", -math.inf), "epoch": best.get("epoch", 0)}
        run.load_records(start_epoch)
        say(f"resuming {run.path} at epoch {start_epoch + 1}, batch {start_batch}"
            + (f" (overrides: {', '.join(overrides)})" if overrides else ""))
    run.write_text("config.yaml", dump_yaml(cfg))
    run.log(f"start: model={cfg.model} data={cfg.data} device={device} params={params} macs={macs}")

    forward: nn.Module = model
    if distributed:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    eval_model = ema.module if ema is not None else model
    eval_splits = task.eval_splits(data)
    select_on = eval_splits[0]
    select_key = f"{select_on}_{task.primary}"
    say(
        f"convforge train ({task.name}): {cfg.model} ({params:,} params, {macs / 1e6:.2f} M MACs) on {cfg.data} "
        f"[{len(data.train)} train, {'x'.join(map(str, input_size))} inputs] "
        f"device={device} threads={torch.get_num_threads()}\n"
        f"  epochs={cfg.epochs} batch={cfg.batch_size} {cfg.optimizer} lr={cfg.lr:g} wd={cfg.weight_decay:g} "
        f"{cfg.schedule} warmup={cfg.warmup_epochs:g} augment={cfg.augment} label_smoothing={cfg.label_smoothing:g}"
        f"{' ema' if cfg.ema else ''}{' amp' if cfg.amp else ''}{' channels_last' if cfg.channels_last else ''}"
        f"{' compile' if cfg.compile else ''}  run dir: {run.path}"
    )

    check_every = 1 if device.type == "cpu" else 25
    train_seconds = sum(r.get("train_time_s", 0.0) for r in run.records)
    global_step = start_epoch * steps_per_epoch + start_batch
    epoch = start_epoch
    batch_index = start_batch
    lr = cfg.lr
    sums: dict[str, float] = {}
    epoch_start = time.perf_counter()

    skipped_in_a_row = 0
    health: dict[str, Any] | None = None
    if cfg.filter_health and role.is_main:
        from convforge.inspect import filter_health

        health = filter_health(model)  # the baseline: only flags that appear later are warned about
    tensorboard = None
    if cfg.tensorboard and role.is_main:
        from convforge.report.tensorboard import TensorboardLogger

        tensorboard = TensorboardLogger(run.path)

    def save_state(next_epoch: int, next_batch: int, partial_sums: dict[str, float]) -> None:
        if role.is_main:
            extra = {"epoch": next_epoch, "batch": next_batch, "best": best, "partial": partial_sums,
                     "world_size": role.world_size,
                     "global_step": next_epoch * steps_per_epoch + next_batch}
            save_train_state(run.file("resume.safetensors"), model, optimizer, ema, extra)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            train_loader.set_epoch(epoch)
            sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}
            if epoch == start_epoch and start_batch and role.is_main:
                sums.update(partial)  # the saved partial sums are global: restore them once
            epoch_start = time.perf_counter()
            seen_this_session = 0
            with EpochBar(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch, enabled=role.is_main and not quiet) as bar:
                batches = train_loader.iter_from(start_batch if epoch == start_epoch else 0)
                batch_index = start_batch if epoch == start_epoch else 0
                for x, y in batches:
                    lr = lr_at(global_step, total_steps, warmup_steps, cfg.lr, cfg.schedule)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    clean = x
                    targets = MixedTargets(y, y, 1.0)
                    if mixing and classify:
                        rng = batch_rng(cfg.seed, epoch, batch_index, role.rank)
                        x, targets = mix_batch(x, y, cfg.mixup_alpha, cfg.cutmix_alpha, rng)
                        x = random_erase(x, cfg.random_erasing, rng)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                        logits = forward(x)
                        if classify:
                            loss = targets.loss(logits.float(), cfg.label_smoothing)
                        else:
                            loss = task.loss(logits.float(), y, cfg, data)
                        if teachers:
                            view = x if cfg.kd_consistent else (
                                train_loader.clean_batch(train_loader.last_indices) if cfg.augment != "none" else clean)
                            soft = sum(t.probabilities(view, student_mean, student_std, cfg.kd_temperature)
                                       for t in teachers) / len(teachers)
                            loss = ((1 - cfg.kd_alpha) * loss
                                    + cfg.kd_alpha * distillation_loss(logits, soft, cfg.kd_temperature))
                    if (cfg.nan_policy == "stop" and global_step % check_every == 0
                            and not all_ranks_agree(bool(torch.isfinite(loss)), device)):
                        raise NonFiniteLossError(_nonfinite_message(float(loss.detach()), epoch, batch_index, lr, run))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.nan_policy == "skip-batch" and not all_ranks_agree(_loss_and_grads_finite(loss, model), device):
                        sums["skipped"] = sums.get("skipped", 0.0) + 1
                        skipped_in_a_row += 1
                        if skipped_in_a_row > MAX_SKIPS_IN_A_ROW:
                            raise NonFiniteLossError(_nonfinite_message(
                                float(loss.detach()), epoch, batch_index, lr, run,
                                f"{skipped_in_a_row} batches in a row had a non-finite loss or gradient"))
                        say(f"warning: non-finite loss or gradient at epoch {epoch + 1}, batch {batch_index}: "
                            f"batch skipped ({sums['skipped']:.0f} this epoch)")
                        optimizer.zero_grad(set_to_none=True)
                        global_step += 1
                        batch_index += 1
                        continue
                    skipped_in_a_row = 0
                    if cfg.grad_clip:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    if hold_zeros is not None:
                        hold_zeros()
                    if ema is not None:
                        ema.update(model)
                    global_step += 1
                    batch_index += 1
                    fault_point("step")
                    seen_this_session += y.shape[0]
                    sums["loss"] += float(loss.detach()) * y.shape[0]
                    if classify:
                        sums["correct"] += float((logits.detach().argmax(1) == y).sum())
                    sums["seen"] += y.shape[0]
                    elapsed = time.perf_counter() - epoch_start
                    bar.update(batch_index, sums["loss"] / sums["seen"], 100 * sums["correct"] / sums["seen"],
                               seen_this_session / max(elapsed, 1e-9))
                    if cfg.save_every_steps and global_step % cfg.save_every_steps == 0 and batch_index < steps_per_epoch:
                        save_state(epoch, batch_index, {**_global_sums(sums), "time": sums["time"] + elapsed})
            sums = {**sums, **_global_sums(sums)}
            if not sums["seen"]:
                raise NonFiniteLossError(_nonfinite_message(
                    math.nan, epoch, batch_index, lr, run, "every batch of the epoch had a non-finite loss or gradient"))
            if not math.isfinite(sums["loss"]):
                raise NonFiniteLossError(_nonfinite_message(sums["loss"], epoch, batch_index, lr, run))
            epoch_time = sums["time"] + time.perf_counter() - epoch_start
            train_seconds += time.perf_counter() - epoch_start
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": sums["loss"] / sums["seen"],
                **({"train_top1": 100 * sums["correct"] / sums["seen"]} if classify else {}),
                "lr": lr,
                "images_per_s": seen_this_session / max(time.perf_counter() - epoch_start, 1e-9),
                "train_time_s": epoch_time,
            }
            if cfg.nan_policy == "skip-batch":
                record["skipped_batches"] = int(sums.get("skipped", 0))
            last_epoch = epoch + 1 == cfg.epochs
            if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
                fault_point("eval")
                eval_start = time.perf_counter()
                for split_name in eval_splits:
                    result = task.evaluate(eval_model, data, split_name, cfg, device, role.rank, role.world_size)
                    record.update({f"{split_name}_{key}": value for key, value in result.items()})
                record["eval_time_s"] = time.perf_counter() - eval_start
            if cfg.filter_health and role.is_main:
                health = filter_health(model, previous=health)
                record["filter_health"] = {"summary": health["summary"], "layers": health["layers"]}
                for warning in health["warnings"]:
                    run.log(f"filter health: {warning}")
                    say(f"warning: filter health: {warning}")
            record["elapsed_s"] = time.perf_counter() - started
            run.append_record(record)
            if tensorboard is not None:
                tensorboard.log_epoch(epoch + 1, record)
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k.startswith(
                ("train_", *(f"{name}_" for name in eval_splits)))}
            meta = checkpoint_meta(cfg, data, model_args, metrics, epoch + 1, task, input_size)
            if init is not None:
                meta.update(init.meta)
            if role.is_main:
                save_checkpoint(run.file("last.safetensors"), eval_model, meta)
                if select_key in record and record[select_key] > best["score"]:
                    best = {"score": record[select_key], "epoch": epoch + 1}
                    save_checkpoint(run.file("best.safetensors"), eval_model, meta)
            save_state(epoch + 1, 0, {})
            line = _epoch_line(record, cfg.epochs, eval_splits, task.primary)
            run.log(line)
            say(line)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    except (KeyboardInterrupt, TrainingInterrupted) as exc:
        code = exc.exit_code if isinstance(exc, TrainingInterrupted) else 130
        if 0 < batch_index < steps_per_epoch and sums:
            sums["time"] += time.perf_counter() - epoch_start
            save_state(epoch, batch_index, sums)
        message = (f"interrupted at epoch {epoch + 1}, batch {batch_index}; state saved. "
                   f"Resume with: convforge train --resume {run.path}")
        run.log(message)
        say(message)
        raise TrainingInterrupted(code) from None
    except NonFiniteLossError as exc:
        run.log(str(exc))
        run.write_json("summary.json", {"status": "diverged", "error": str(exc), "run_dir": str(run.path)})
        raise

    finally:
        if tensorboard is not None:
            tensorboard.close()

    final = run.records[-1]
    summary = {
        "status": "completed",
        "run_dir": str(run.path),
        "model": cfg.model,
        "data": cfg.data,
        "epochs": cfg.epochs,
        "task": task.name,
        "test_top1": final.get("test_top1"),
        "test_top5": final.get("test_top5"),
        "test_loss": final.get("test_loss"),
        "val_top1": final.get("val_top1"),
        "metrics": {k: v for k, v in final.items() if k.startswith(tuple(f"{name}_" for name in eval_splits))
                    and isinstance(v, (int, float))},
        "best_epoch": best["epoch"],
        "best_top1": best["score"] if classify else None,
        "best_score": best["score"],
        "best_selected_on": select_on,
        "best_metric": select_key,
        "params": params,
        "macs": macs,
        "train_time_s": train_seconds,
        "wall_time_s": time.perf_counter() - started,
        "images_per_s": steps_per_epoch * cfg.batch_size * role.world_size * cfg.epochs / max(train_seconds, 1e-9),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "checkpoints": {"best": str(run.file("best.safetensors")), "last": str(run.file("last.safetensors"))},
    }
    run.write_json("summary.json", summary)
    if cfg.report and role.is_main:
        from convforge.report import write_report

        try:
            report_path = write_report([run.path], run.file("report.html"))
            summary["report"] = str(report_path)
            say(f"report: {report_path}")
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded; the report can be redone
            say(f"warning: the report could not be written ({type(exc).__name__}: {exc}); "
                f"retry with: convforge report {run.path}")
    if classify:
        run.log(f"done: test top-1 {summary['test_top1']:.2f}% in {summary['wall_time_s']:.1f} s")
    else:
        run.log(f"done: {select_key} {final.get(select_key, math.nan):.4g} in {summary['wall_time_s']:.1f} s")
    return summary


DATA_INIT_IMAGES = 5000


def _zero_holder(model: nn.Module, say: Callable[[str], None]) -> Callable[[], None]:
    """For --keep-sparsity: a function that sets the starting model's zero conv/linear weights back to zero."""
    from convforge.compress.prune import apply_masks, prunable_weights

    masks = {name: weight.detach() != 0 for name, weight in prunable_weights(model)}
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    say(f"note: --keep-sparsity: {zeros:,} of {total:,} conv/linear weights ({zeros / max(total, 1):.1%}) stay at zero")
    return lambda: apply_masks(model, masks)


def _data_of_init(config: TrainConfig) -> TrainConfig:
    """With --init and no --data: the data the checkpoint was trained on (when it names a spec)."""
    from convforge.train.checkpoint import read_checkpoint_meta
    from convforge.train.init import is_foreign_weights

    if is_foreign_weights(config.init):  # type: ignore[arg-type]
        return config
    spec = read_checkpoint_meta(config.init).get("data", {}).get("spec")  # type: ignore[arg-type]
    return dataclasses.replace(config, data=spec) if spec else config


def _init_from_data(model: nn.Module, data: Dataset, seed: int) -> None:
    """Data-dependent initialisation (e.g. SpeedNet's whitening stem) from a seeded sample of train images.

    Every rank draws the same sample, so all processes start from the same weights; a resumed run
    overwrites them with the saved ones.
    """
    from convforge.data import normalize
    from convforge.data.loader import epoch_permutation

    indices = epoch_permutation(len(data.train), seed, -1)[:DATA_INIT_IMAGES]
    model.init_from_data(normalize(data.train.images[indices], data.mean, data.std))


def _epoch_line(record: dict[str, Any], epochs: int, eval_splits: list[str] | None = None,
                primary: str = "top1") -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train_loss']:.4f}"]
    if "train_top1" in record:
        parts.append(f"train {record['train_top1']:.2f}%")
    unit = {"top1": "%", "miou": "% mIoU", "psnr": " dB"}.get(primary, "")
    for name in eval_splits or ("val", "test"):
        if f"{name}_{primary}" in record:
            parts.append(f"{name} {record[f'{name}_{primary}']:.2f}{unit}")
    parts += [f"lr {record['lr']:.3g}", f"{record['images_per_s']:.0f} img/s", f"{record['elapsed_s']:.1f} s"]
    return "  ".join(parts)


MAX_SKIPS_IN_A_ROW = 20
SUMMED_OVER_RANKS = ("loss", "correct", "seen", "skipped")


def _global_sums(sums: dict[str, float]) -> dict[str, float]:
    """The epoch's running sums over all processes (the same dict on one process)."""
    values = torch.tensor([sums.get(k, 0.0) for k in SUMMED_OVER_RANKS], dtype=torch.float64)
    all_reduce_sum(values)
    return dict(zip(SUMMED_OVER_RANKS, values.tolist()))


def _loss_and_grads_finite(loss: torch.Tensor, model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not torch.isfinite(loss):
        return False
    return bool(torch.isfinite(torch.stack([g.abs().amax() for g in grads]).amax())) if grads else True


def _nonfinite_message(value: float, epoch: int, batch: int, lr: float, run: RunDir, what: str = "") -> str:
    """Why training stopped, where the last good checkpoint is, and what to try (``what`` replaces the loss part)."""
    last = run.file("last.safetensors")
    kept = f"the last good checkpoint is {last}" if last.exists() else "no epoch had finished, so no checkpoint was written"
    skip_hint = "" if what else ", or --nan-policy skip-batch to skip such batches"
    what = what or f"loss became {value}"
    return (f"{what} at epoch {epoch + 1}, batch {batch} (lr {lr:.3g}); training stopped and {kept}. "
            f"Try a lower learning rate (e.g. --lr {lr / 10:.3g}) or --grad-clip 1.0{skip_hint}.")
