"""The Task base class (what the engine asks of a task) and the task registry.

A task says everything in which training one kind of model differs from another: its data, model,
batches, loss, running statistics, evaluation, metric formatting and checkpoint facts. The engine
calls only these hooks, so a new task (registered with :func:`register_task`, also from outside
convforge) needs no engine code. Configurations are passed as ``Any`` (a ``TrainConfig``): this
package must not import ``convforge.config``, which imports the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from convforge.errors import ConfigError
from convforge.models import create_model
from convforge.train.checkpoint import CLASSLESS_TASKS

# Options that only mean something for classification (mixing, smoothing, distillation, flip TTA).
CLASSIFY_ONLY = ("adv_train", "mixup_alpha", "cutmix_alpha", "random_erasing", "teachers", "teacher_model", "eval_tta",
                 "label_smoothing", "store_size")


@dataclass
class Step:
    """One training step as a task sees it (``extras`` is what :meth:`Task.start_training` returned)."""

    cfg: Any
    data: Any
    epoch: int
    batch: int
    rank: int
    loader: Any
    extras: dict[str, Any] = field(default_factory=dict)
    clean: torch.Tensor | None = None  # the batch as loaded, before prepare_batch
    model: nn.Module | None = None  # the model being trained (unwrapped: attacks run on it directly)
    forward: nn.Module | None = None  # the model as the step calls it (DDP- and compile-wrapped)


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Task:
    """A task's name and the metric that selects the best checkpoint (higher is better), with its hooks.

    Subclasses set ``name``, ``primary`` and ``unit`` (shown after the primary metric) and override
    what differs; the defaults describe a task whose loader yields ``(input, target)`` batches and
    whose loss is :meth:`loss`.
    """

    name: str = ""
    primary: str = ""
    unit: str = ""
    outputs_are_classes: bool = True  # the model's outputs are classes (a head sized by the class count)
    stat_keys: tuple[str, ...] = ()  # per-step sums (besides loss and images) that step_stats returns
    # A method ``report_section(self, run_data) -> HTML`` gives the report's evaluation section of this
    # task's runs (see convforge.report.html); None: a registered section, else a metrics table.
    report_section: Callable[[Any], str] | None = None

    def __init__(self, name: str | None = None, primary: str | None = None) -> None:
        self.name = name or self.name
        self.primary = primary or self.primary
        if not self.name or not self.primary:
            raise ConfigError(f"{type(self).__name__}: a task needs a name and a primary metric")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, primary={self.primary!r})"

    # ------------------------------------------------------------ configuration and data

    def augments(self) -> tuple[str, ...]:
        """The values ``--augment`` may take for this task."""
        from convforge.data.loader import AUGMENTS

        return tuple(AUGMENTS)

    def check_config(self, cfg: Any) -> None:
        """Raise ConfigError for options this task cannot use (called by ``TrainConfig.validate``)."""
        augments = self.augments()
        if cfg.augment is not None and cfg.augment not in augments:
            raise ConfigError(f"unknown augment {short_repr(cfg.augment)} for --task {cfg.task}: "
                              f"use one of {', '.join(augments)}")
        unsupported = [name for name in CLASSIFY_ONLY if getattr(cfg, name)]
        if unsupported:
            raise ConfigError(f"{', '.join(unsupported)}: classification only, not for --task {cfg.task}")

    def load_data(self, cfg: Any, log: Callable[[str], None]) -> Any:
        """The data set of ``cfg.data`` (with ``train``, ``mean``, ``std``, ``channels``, ``image_size``...)."""
        from convforge.data import load
        from convforge.data.views import DEFAULT_CROP_PCT

        return load(cfg.data, image_size=cfg.image_size, skip_bad_images=cfg.skip_bad_images,
                    cache_dir=cfg.cache_dir, log=log, store_size=getattr(cfg, "store_size", None),
                    crop_pct=getattr(cfg, "crop_pct", None) or DEFAULT_CROP_PCT,
                    eval_image_size=getattr(cfg, "eval_image_size", None),
                    interpolation=getattr(cfg, "interpolation", None) or "bilinear")

    def model_args(self, cfg: Any, data: Any) -> dict[str, Any]:
        """The keyword arguments the model is built with (and that checkpoints record)."""
        args = dict(cfg.model_args)
        if cfg.drop_path is not None:
            args["drop_path_rate"] = cfg.drop_path
        return args

    def build_model(self, cfg: Any, data: Any, model_args: dict[str, Any]) -> nn.Module:
        """A fresh model of the registry name ``cfg.model``; it must be a model of this task."""
        model = create_model(cfg.model, num_classes=data.num_classes, in_chans=data.channels, **model_args)
        model_task = getattr(model, "task", "classify")
        if model_task != self.name:
            raise ConfigError(f"model {cfg.model!r} is a {model_task} model; use --task {model_task} "
                              f"or a {self.name} model (convforge models lists them)")
        return model

    def prepare_model(self, model: nn.Module, data: Any, cfg: Any, from_init: bool) -> None:
        """Anything done to a freshly built model before training (``from_init``: weights came from --init)."""

    def input_size(self, data: Any, model: nn.Module) -> tuple[int, ...]:
        """The (C, H, W) of one model input during training (for MACs)."""
        return (data.channels, *data.image_size)

    def train_loader(self, data: Any, cfg: Any, model: nn.Module, device: torch.device, rank: int,
                     world_size: int) -> Any:
        """The training batches: ``len()``, ``set_epoch(e)``, ``iter_from(batch)`` yielding ``(x, y)``."""
        raise NotImplementedError(f"task {self.name!r} has no train_loader")

    # ------------------------------------------------------------ the training step

    def start_training(self, cfg: Any, data: Any, device: torch.device) -> dict[str, Any]:
        """Per-run helpers the step needs (e.g. distillation teachers); given to every step as ``extras``."""
        return {}

    def prepare_batch(self, x: torch.Tensor, y: Any, step: Step) -> tuple[torch.Tensor, Any]:
        """The model input and the loss target of a loaded batch (e.g. mixed images and mixed labels)."""
        return x, y

    def training_loss(self, output: torch.Tensor, target: Any, x: torch.Tensor, step: Step) -> torch.Tensor:
        """The loss one step minimises (runs under autocast when --amp is on)."""
        return self.loss(output.float(), target, step.cfg, step.data)

    def loss(self, output: torch.Tensor, target: Any, cfg: Any, data: Any) -> torch.Tensor:
        """The task's loss of ``output`` against ``target``."""
        raise NotImplementedError(f"task {self.name!r} has no loss")

    def step_stats(self, output: torch.Tensor, y: Any) -> dict[str, float]:
        """Sums (keys in ``stat_keys``) a step adds to the epoch's running statistics."""
        return {}

    def epoch_stats(self, sums: dict[str, float]) -> dict[str, float]:
        """Entries of the epoch record from the summed statistics (``sums['seen']`` samples)."""
        return {}

    def progress_value(self, sums: dict[str, float]) -> float:
        """The running figure the progress bar shows beside the loss."""
        return 0.0

    # ------------------------------------------------------------ evaluation and reporting

    def eval_splits(self, data: Any) -> list[str]:
        """The splits (or test sets) evaluated after an epoch; the first selects the best checkpoint."""
        return ["val", "test"] if data.val is not None else ["test"]

    def evaluate(self, model: nn.Module, data: Any, split: str, cfg: Any, device: torch.device,
                 rank: int, world_size: int) -> dict[str, Any]:
        """Metrics of ``model`` on ``split``; must include :attr:`primary`."""
        raise NotImplementedError(f"task {self.name!r} has no evaluate")

    def select_metric(self, cfg: Any) -> str:
        """The metric (higher is better) whose best epoch is saved as best.safetensors: :attr:`primary`."""
        return self.primary

    def meta(self, data: Any) -> dict[str, Any]:
        """Task facts a checkpoint needs to be used without restating them."""
        return {}

    def format_metric(self, value: float) -> str:
        """The primary metric as the epoch line shows it."""
        return f"{value:.2f}{self.unit}"

    def epoch_text(self, record: dict[str, Any], eval_splits: list[str]) -> list[str]:
        """The task's parts of the epoch line: training figures, then the primary metric of each split."""
        return [f"{name} {self.format_metric(record[f'{name}_{self.primary}'])}"
                for name in eval_splits if f"{name}_{self.primary}" in record]

    def summary_fields(self, final: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
        """Task-specific entries of summary.json (``final``: the last epoch's record)."""
        return {}

    def done_text(self, final: dict[str, Any], select_key: str, wall_time_s: float) -> str:
        """The last line of train.log."""
        return f"done: {select_key} {final.get(select_key, float('nan')):.4g} in {wall_time_s:.1f} s"


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Make ``task`` available as ``--task task.name`` (``replace``: over a task of the same name)."""
    if not isinstance(task, Task):
        raise ConfigError(f"register_task needs a convforge.train.tasks.Task, got {type(task).__name__}")
    if task.name in _REGISTRY and not replace and type(_REGISTRY[task.name]) is not type(task):
        raise ConfigError(f"a task named {task.name!r} is already registered ({_REGISTRY[task.name]!r}); "
                          "choose another name or pass replace=True")
    _REGISTRY[task.name] = task
    if task.outputs_are_classes:
        CLASSLESS_TASKS.discard(task.name)
    else:
        CLASSLESS_TASKS.add(task.name)
    return task


def unregister_task(name: str) -> None:
    """Remove a registered task (a plugin's or a test's); unknown names are ignored."""
    _REGISTRY.pop(name, None)
    CLASSLESS_TASKS.discard(name)


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown task {short_repr(name)}: use one of {', '.join(task_names())}") from None


def task_names() -> list[str]:
    """The names of the registered tasks, built-in ones first."""
    return list(_REGISTRY)


def check_task_options(cfg: Any) -> None:
    """``cfg.task`` is registered and ``cfg`` sets no option that task cannot use (TrainConfig.validate)."""
    if cfg.task not in _REGISTRY:
        raise ConfigError(f"unknown task {short_repr(cfg.task)}: use one of {', '.join(task_names())}")
    _REGISTRY[cfg.task].check_config(cfg)
