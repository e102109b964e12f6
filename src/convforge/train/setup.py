"""The set-up steps of a training run, in order: config, process, data, model, optimizer, resume, banner."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from convforge.allocator import keep_freed_blocks
from convforge.config import TrainConfig, dump_yaml, load_yaml, resolve_store_size
from convforge.errors import CheckpointError, ConfigError, DataError
from convforge.measure import count_macs, count_params
from convforge.progress import echo
from convforge.recipes import apply_recipe
from convforge.train.adversarial import describe as describe_adversarial
from convforge.train.adversarial import resolve_adversarial
from convforge.train.checkpoint import load_train_state
from convforge.train.distributed import barrier, broadcast_object, convert_sync_batchnorm, init_distributed
from convforge.train.ema import Lookahead, ModelEma
from convforge.train.optim import build_optimizer
from convforge.train.qat import (check_init_not_quantized, describe_quantization, prepare_for_training,
                                  resolve_quantization)
from convforge.train.rundir import ProcessRole, RunDir, default_run_dir
from convforge.train.sparsity import apply_masks, prunable_weights
from convforge.train.state import TrainingState
from convforge.train.tasks import get_task


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is a GPU), ``cpu``, ``cuda`` or ``cuda:N``."""
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


def resolve_config(config: TrainConfig | None) -> tuple[TrainConfig, list[str]]:
    """The run's config: the saved one on --resume, the recipe filled in, checked, --init's data by default."""
    config = config or TrainConfig()
    overrides: list[str] = []
    if config.resume:
        config, overrides = config_for_resume(config)
    config = apply_recipe(config)
    config.validate()
    if config.init and not config.resume and "data" not in getattr(config, "explicit_fields", set()) \
            and config.data == TrainConfig.data:
        config = _data_of_init(config)
    return config, overrides


def _data_of_init(config: TrainConfig) -> TrainConfig:
    """With --init and no --data: the data the checkpoint was trained on (when it names a spec)."""
    from convforge.train.checkpoint import read_checkpoint_meta
    from convforge.train.init import is_foreign_weights

    if is_foreign_weights(config.init):  # type: ignore[arg-type]
        return config
    spec = read_checkpoint_meta(config.init).get("data", {}).get("spec")  # type: ignore[arg-type]
    return dataclasses.replace(config, data=spec) if spec else config


def start_process(config: TrainConfig, role: ProcessRole | None, quiet: bool, overrides: list[str],
                  started: float) -> TrainingState:
    """Threads, device, the process group (DDP) and the seed: a state with nothing else set up yet."""
    role = role or ProcessRole.from_env()
    say = (lambda message: None) if quiet or not role.is_main else echo
    if config.threads:
        torch.set_num_threads(config.threads)
    keep_freed_blocks()
    device = resolve_device(config.device)
    if device.type == "cuda" and role.world_size > 1:
        device = torch.device("cuda", role.local_rank)
        torch.cuda.set_device(device)
    distributed = init_distributed(role, device, config.dist_timeout)
    torch.manual_seed(config.seed)
    return TrainingState(cfg=config, task=get_task(config.task), role=role, device=device, distributed=distributed,
                         say=say, quiet=quiet, started=started, overrides=overrides)


def load_data(state: TrainingState) -> None:
    """The data (rank 0 first, so that only it fills the cache), the resolved config, --init weights, run dir."""
    config, role, task = state.cfg, state.role, state.task
    from convforge.train.init import load_init, pretrained_defaults

    config, pretrained = pretrained_defaults(config)  # --init FILE.pth: the weights' preprocessing by default
    config, store_note = resolve_store_size(config)  # after the defaults: auto follows their sizes
    if store_note:
        state.say(f"note: {store_note}")
    if not role.is_main:
        barrier()
    data = task.load_data(config, state.say)
    if role.is_main:
        barrier()
    if data.train is None:
        raise DataError(f"{config.data} has no train split to train on (expected a train/ folder)")
    cfg = resolve_adversarial(config.resolved(data.channels, data.image_size, data.default_augment, role.world_size))
    cfg = resolve_quantization(cfg)
    for note in data.notes:
        state.say(f"note: {note}")
    state.model_args = task.model_args(cfg, data)
    if cfg.init:
        _check_init_float(cfg.init)
        init = load_init(cfg.init, cfg.model, task.name, data, state.model_args, pretrained)
        cfg.model, state.model_args = init.model_name, init.model_args
        cfg.init = init.meta["init"]["checkpoint"]  # absolute: a resume from elsewhere finds it
        data.mean, data.std = init.mean, init.std  # the inputs the weights were trained on
        for note in init.notes:
            state.say(f"note: {note}")
        state.init = init
    state.cfg, state.data = cfg, data
    state.run = RunDir(broadcast_object(cfg.out or str(default_run_dir(cfg.model, cfg.data))), role)
    if not cfg.resume and state.run.file("resume.safetensors").exists():
        raise ConfigError(f"{state.run.path} already holds a run; resume it with --resume {state.run.path} "
                          "or choose another --out")


def _check_init_float(path: str) -> None:
    """--init must name a float or binary model (a --qat checkpoint's BatchNorms are folded)."""
    from convforge.train.checkpoint import read_checkpoint_meta
    from convforge.train.init import is_foreign_weights

    if not is_foreign_weights(path):
        check_init_not_quantized(read_checkpoint_meta(path), path)


def build_model(state: TrainingState) -> None:
    """The model (fresh or from --init), the task's per-run helpers, its size, optimizer and EMA."""
    cfg, task, data, device = state.cfg, state.task, state.data, state.device
    try:
        model = state.init.model if state.init is not None else task.build_model(cfg, data, state.model_args)
    except ConfigError as exc:
        if cfg.drop_path is not None and "drop_path_rate" in str(exc):
            raise ConfigError(f"--drop-path: model {cfg.model!r} has no stochastic depth (no drop_path_rate "
                              "argument); leave --drop-path out") from None
        raise
    state.hold_zeros = _zero_holder(model, state.say) if cfg.keep_sparsity else None
    task.prepare_model(model, data, cfg, from_init=state.init is not None)
    model = prepare_for_training(model, cfg)  # --qat / --binary: layers swapped on the traced model
    if state.init is not None and state.init.binary_state:
        _load_binary_state(model, state.init.binary_state, state.say)
    state.extras = task.start_training(cfg, data, device)
    state.params = count_params(model)
    state.input_size = tuple(task.input_size(data, model))
    state.macs = count_macs(model, state.input_size)
    model.to(device)
    if state.distributed and cfg.sync_bn:
        model = convert_sync_batchnorm(model, device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    state.model = model
    state.optimizer = build_optimizer(model, cfg)
    state.ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None


def _load_binary_state(model: nn.Module, binary_state: dict[str, torch.Tensor], say: Callable[[str], None]) -> None:
    """Load the --init binary checkpoint's own parameters (e.g. --binary-react's thresholds and RPReLU) that the
    prepared ``model`` has under the same name and shape."""
    own = model.state_dict()
    carried = {k: v for k, v in binary_state.items() if k in own and own[k].shape == v.shape}
    if carried:
        model.load_state_dict(carried, strict=False)
        say(f"note: --init: {len(carried)} binary-network tensor(s) of the checkpoint carried over as well "
            "(e.g. --binary-react's thresholds and RPReLU)")


def _zero_holder(model: nn.Module, say: Callable[[str], None]) -> Callable[[], None]:
    """For --keep-sparsity: a function that sets the starting model's zero conv/linear weights back to zero."""
    masks = {name: weight.detach() != 0 for name, weight in prunable_weights(model)}
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    say(f"note: --keep-sparsity: {zeros:,} of {total:,} conv/linear weights ({zeros / max(total, 1):.1%}) stay at zero")
    return lambda: apply_masks(model, masks)


def build_loader(state: TrainingState) -> None:
    """The training batches of this process and the step counts of the schedule."""
    cfg, role = state.cfg, state.role
    state.loader = state.task.train_loader(state.data, cfg, state.model, state.device, role.rank, role.world_size)
    state.steps_per_epoch = len(state.loader)
    if state.steps_per_epoch == 0:
        raise ConfigError(
            f"batch size {cfg.batch_size} x {role.world_size} process(es) is larger than the "
            f"{len(state.data.train)} training images; lower --batch-size"
        )
    state.total_steps = state.steps_per_epoch * cfg.epochs
    state.warmup_steps = round(cfg.warmup_epochs * state.steps_per_epoch)
    if cfg.lookahead:  # its schedule needs the step count, known only now
        state.ema = Lookahead(state.model, state.total_steps)


def restore(state: TrainingState) -> None:
    """On --resume: model, optimizer, EMA, RNG, position and partial sums from resume.safetensors."""
    cfg, run = state.cfg, state.run
    if cfg.resume and not run.file("resume.safetensors").exists():
        state.say(f"note: {run.path} has no saved state yet (the run stopped before its first save); "
                  "starting it from the beginning")
    elif cfg.resume:
        extra = load_train_state(run.file("resume.safetensors"), state.model, state.optimizer, state.ema)
        state.start_epoch, state.start_batch = extra["epoch"], extra["batch"]
        best, state.partial = extra["best"], extra["partial"]
        if "score" not in best:  # a run saved before tasks existed
            best = {"score": best.get("top1", -math.inf), "epoch": best.get("epoch", 0)}
        state.best = best
        run.load_records(state.start_epoch)
        state.say(f"resuming {run.path} at epoch {state.start_epoch + 1}, batch {state.start_batch}"
                  + (f" (overrides: {', '.join(state.overrides)})" if state.overrides else ""))
    run.write_text("config.yaml", dump_yaml(cfg))
    run.log(f"start: model={cfg.model} data={cfg.data} device={state.device} params={state.params} "
            f"macs={state.macs}")
    state.train_seconds = sum(r.get("train_time_s", 0.0) for r in run.records)
    state.global_step = state.start_epoch * state.steps_per_epoch + state.start_batch
    state.epoch, state.batch_index, state.lr = state.start_epoch, state.start_batch, cfg.lr


def wrap_model(state: TrainingState) -> None:
    """DDP and torch.compile around the model; what is evaluated and which metric selects the best epoch."""
    cfg, device = state.cfg, state.device
    forward: nn.Module = state.model
    if state.distributed:
        forward = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    state.forward = forward
    state.eval_model = state.ema.module if state.ema is not None else state.model
    state.eval_splits = state.task.eval_splits(state.data)
    state.select_on = state.eval_splits[0]
    state.select_key = f"{state.select_on}_{state.task.select_metric(cfg)}"
    state.check_every = 1 if device.type == "cpu" else 25


def banner(state: TrainingState) -> None:
    """The two lines that say what this run trains, on what, and how."""
    cfg, data = state.cfg, state.data
    state.say(
        f"convforge train ({state.task.name}): {cfg.model} ({state.params:,} params, {state.macs / 1e6:.2f} M MACs) "
        f"on {cfg.data} [{len(data.train)} train, {'x'.join(map(str, state.input_size))} inputs] "
        f"device={state.device} threads={torch.get_num_threads()}{' malloc=keep-freed' * keep_freed_blocks()}\n"
        f"  epochs={cfg.epochs} batch={cfg.batch_size} {cfg.optimizer} lr={cfg.lr:g} wd={cfg.weight_decay:g} "
        f"{cfg.schedule} warmup={cfg.warmup_epochs:g} augment={cfg.augment} label_smoothing={cfg.label_smoothing:g}"
        f"{' ema' if cfg.ema else ''}{' amp' if cfg.amp else ''}{' channels_last' if cfg.channels_last else ''}"
        f"{' compile' if cfg.compile else ''}  run dir: {state.run.path}"
    )
    if cfg.adv_train:
        state.say(f"  {describe_adversarial(cfg)}")
    if cfg.qat or cfg.binary:
        state.say(f"  {describe_quantization(cfg)}")


def set_up(config: TrainConfig | None, role: ProcessRole | None, quiet: bool) -> TrainingState:
    """Every set-up step in order; the returned state is ready for its first epoch."""
    started = time.perf_counter()
    config, overrides = resolve_config(config)
    state = start_process(config, role, quiet, overrides, started)
    load_data(state)
    build_model(state)
    build_loader(state)
    restore(state)
    wrap_model(state)
    banner(state)
    return state
