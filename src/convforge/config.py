"""Training configuration: one dataclass, settable from YAML and from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from convforge.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "resolved from the others" (see ``resolved``)."""

    model: str = "smallcnn"
    data: str = "digits"
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 15
    batch_size: int = 64
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    schedule: str = "onecycle"
    warmup_epochs: float | None = None
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    ema: bool = False
    ema_decay: float = 0.999
    augment: str | None = None
    crop_padding: int | None = None
    image_size: int | None = None
    skip_bad_images: bool = False
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    eval_every: int = 1
    out: str | None = None
    resume: str | None = None
    cache_dir: str | None = None

    def resolved(self, channels: int, image_size: tuple[int, int], default_augment: str) -> "TrainConfig":
        """A copy with every ``None`` default replaced by the value this run will use."""
        cfg = dataclasses.replace(self)
        if cfg.lr is None:
            cfg.lr = (0.1 if cfg.optimizer == "sgd" else 2e-3) * cfg.batch_size / 128
        if cfg.weight_decay is None:
            cfg.weight_decay = 5e-4 if cfg.optimizer == "sgd" else 0.05
        if cfg.warmup_epochs is None:
            cfg.warmup_epochs = round(min(2.0, cfg.epochs * 0.15), 3)
        if cfg.augment is None:
            cfg.augment = default_augment
        if cfg.crop_padding is None:
            cfg.crop_padding = max(1, min(image_size) // 8)
        return cfg

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}"),
            (self.warmup_epochs is None or 0 <= self.warmup_epochs <= self.epochs,
             f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        return cls(**coerce_fields(values, source))


def coerce_fields(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check names and types of ``values`` against TrainConfig's fields, with errors naming ``source``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
    hints = get_type_hints(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            import difflib

            close = difflib.get_close_matches(name, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown option {key!r}{hint}")
        out[name] = _coerce(value, hints[name], f"{source}: option {key!r}")
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where} may not be empty")
    if "dict" in text:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if "bool" in text:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if "int" in text and "float" not in text:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if "float" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (safe loader) into a dict of checked option values."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return coerce_fields(values or {}, str(path))


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
