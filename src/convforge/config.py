"""Training configuration: one dataclass, settable from YAML and from the command line."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_type_hints

import yaml

from convforge.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant", "step", "triangle")
PAD_MODES = ("zeros", "reflect")
NAN_POLICIES = ("stop", "skip-batch")
DEFAULT_RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (w / h), torchvision's default
DEFAULT_RANDAUGMENT = (2, 9)  # RandAugment's ops per image and magnitude level, torchvision's defaults
MAX_RRC_RATIO = 100.0


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "resolved from the others" (see ``resolved``)."""

    model: str = "smallcnn"
    data: str = "digits"
    task: str = "classify"
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 15
    batch_size: int = 64
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    decay_all: bool = False
    norm_lr_scale: float = 1.0
    schedule: str = "onecycle"
    warmup_epochs: float | None = None
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    random_erasing: float = 0.0
    drop_path: float | None = None
    adv_train: str | None = None
    adv_eps: float | None = None
    adv_steps: int | None = None
    adv_step_size: float | None = None
    adv_beta: float | None = None
    adv_eval_samples: int | None = None
    qat: str | None = None
    qat_freeze_bn_fraction: float | None = None
    binary: str | None = None
    binary_method: str | None = None
    binary_shortcuts: bool = False
    binary_ste: str | None = None
    binary_react: bool = False
    teachers: list[str] = field(default_factory=list)
    teacher_model: str | None = None
    teacher_weights: str | None = None
    teacher_mean: list[float] | None = None
    teacher_std: list[float] | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    kd_consistent: bool = False
    eval_tta: bool = False
    eval_tta_shift: int = 0
    filter_health: bool = False
    report: bool = False
    tensorboard: bool = False
    recipe: str | None = None
    grad_clip: float | None = None
    nan_policy: str = "stop"
    ema: bool = False
    ema_decay: float = 0.999
    lookahead: bool = False
    augment: str | None = None
    scale: int = 3
    dice_weight: float = 0.0
    seg_crop: list[float] | None = None
    seg_scales: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_padding: int | None = None
    pad_mode: str = "zeros"
    image_size: int | list[int] | None = None
    store_size: int | str | None = None  # N, or auto (resolve_store_size)
    crop_pct: float | None = None
    interpolation: str | None = None
    eval_image_size: int | list[int] | None = None
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    rrc_ratio: list[float] = field(default_factory=lambda: list(DEFAULT_RRC_RATIO))
    randaugment: list[int] = field(default_factory=lambda: list(DEFAULT_RANDAUGMENT))
    progressive_resize: list[int] | None = None
    skip_bad_images: bool = False
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    sync_bn: bool = False
    dist_timeout: float = 1800.0
    eval_every: int = 1
    save_every_steps: int = 0
    out: str | None = None
    resume: str | None = None
    init: str | None = None
    keep_sparsity: bool = False
    cache_dir: str | None = None

    def resolved(
        self, channels: int, image_size: tuple[int, int], default_augment: str, world_size: int = 1
    ) -> TrainConfig:
        """A copy with every ``None`` default replaced by the value this run will use.

        The default learning rate follows the linear scaling rule for the *global* batch
        (``batch_size * world_size``): 0.1 per 128 images for SGD, 2e-3 per 128 for AdamW.
        """
        cfg = dataclasses.replace(self)
        if cfg.lr is None:
            cfg.lr = (0.1 if cfg.optimizer == "sgd" else 2e-3) * cfg.batch_size * world_size / 128
        if cfg.weight_decay is None:
            cfg.weight_decay = 5e-4 if cfg.optimizer == "sgd" else 0.05
        if cfg.warmup_epochs is None and cfg.schedule == "triangle":
            cfg.warmup_epochs = round(cfg.epochs * 0.23, 3)  # airbench94's share of the steps
        elif cfg.warmup_epochs is None:
            cfg.warmup_epochs = round(min(2.0, cfg.epochs * 0.15), 3)
        if cfg.augment is None:
            cfg.augment = default_augment
        if cfg.crop_padding is None:
            cfg.crop_padding = max(1, min(image_size) // 8)
        return cfg

    def validate(self) -> None:
        _check_types_and_limits(self)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}"),
            (not (self.ema and self.lookahead), "--ema and --lookahead both keep a slow copy of the weights: "
                                                 "choose one"),
            (0 < self.norm_lr_scale <= 1000, f"norm_lr_scale must be in (0, 1000], got {self.norm_lr_scale}"),
            (self.pad_mode in PAD_MODES, f"pad_mode must be one of {', '.join(PAD_MODES)}, got {self.pad_mode!r}"),
            (0 <= self.eval_tta_shift <= 8, f"eval_tta_shift must be in 0..8 pixels, got {self.eval_tta_shift}"),
            (self.eval_tta or not self.eval_tta_shift, "--eval-tta-shift adds shifted views to the flip TTA: "
                                                      "add --eval-tta"),
            (self.warmup_epochs is None or 0 <= self.warmup_epochs <= self.epochs,
             f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.save_every_steps >= 0, f"save_every_steps must be >= 0 (0: at epoch ends only), got {self.save_every_steps}"),
            (self.nan_policy in NAN_POLICIES,
             f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {self.nan_policy!r}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.dist_timeout > 0, f"dist_timeout must be > 0 seconds, got {self.dist_timeout}"),
            (self.mixup_alpha >= 0, f"mixup_alpha must be >= 0 (0: off), got {self.mixup_alpha}"),
            (self.cutmix_alpha >= 0, f"cutmix_alpha must be >= 0 (0: off), got {self.cutmix_alpha}"),
            (0 <= self.random_erasing <= 1, f"random_erasing must be a probability in [0, 1], got {self.random_erasing}"),
            (self.drop_path is None or 0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}"),
            (0 <= self.kd_alpha <= 1, f"kd_alpha must be in [0, 1], got {self.kd_alpha}"),
            (self.kd_temperature > 0, f"kd_temperature must be > 0, got {self.kd_temperature}"),
            (not self.keep_sparsity or bool(self.init),
             "--keep-sparsity holds the zero weights of the --init checkpoint at zero: give --init CKPT"),
            ((self.teacher_model is None) == (self.teacher_weights is None),
             "give --teacher-model and --teacher-weights together (a foreign teacher needs both)"),
            ((self.teacher_mean is None) == (self.teacher_std is None),
             "give --teacher-mean and --teacher-std together"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        return cls(**coerce_fields(values, source))


# Upper limits, so that an absurd value is a clear error here instead of an overflow deep in training.
LIMITS = {"adv_eval_samples": 10_000_000, "epochs": 1_000_000, "batch_size": 1 << 24, "eval_every": 1_000_000, "threads": 4096,
          "crop_padding": 4096, "store_size": 65536, "seed": 2**32 - 1}
MAX_IMAGE_SIZE = 8192  # the largest image_size / eval_image_size side
AUTO = "auto"  # store_size: chosen from the training and evaluation sizes (resolve_store_size)
_MODEL_ARGS_MAX_DEPTH = 16
_MODEL_ARGS_MAX_ITEMS = 10_000


# Checks that know the tasks: that ``cfg.task`` exists and the options it cannot use. convforge.train
# installs the task registry's check here (this module must not import convforge.train, which imports it).
TASK_CHECKS: list[Callable[[TrainConfig], None]] = []


def add_task_check(check: Callable[[TrainConfig], None]) -> None:
    """Have ``TrainConfig.validate`` call ``check(cfg)`` (see ``TASK_CHECKS``); each function once."""
    if check not in TASK_CHECKS:
        TASK_CHECKS.append(check)


def _check_types_and_limits(cfg: TrainConfig) -> None:
    """The checks ``validate`` adds to the per-field ones: types (for a TrainConfig built directly),
    ranges that would otherwise fail deep inside training, and characters no path may hold."""
    coerce_fields(dataclasses.asdict(cfg), "config")
    for name, high in LIMITS.items():
        value = getattr(cfg, name)
        low = 0 if name in ("crop_padding", "seed", "adv_eval_samples") else 1
        if value is not None and value != AUTO and not low <= value <= high:
            raise ConfigError(f"{name} must be in {low}..{high}, got {value}")
    if not 0 <= cfg.momentum <= 1:
        raise ConfigError(f"momentum must be in [0, 1], got {cfg.momentum}")
    if cfg.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d{1,4}", cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {_short(cfg.device)}")
    if cfg.scale not in (2, 3, 4):
        raise ConfigError(f"scale must be 2, 3 or 4, got {cfg.scale}")
    if cfg.dice_weight < 0:
        raise ConfigError(f"dice_weight must be >= 0, got {cfg.dice_weight}")
    if cfg.seg_crop is not None and (len(cfg.seg_crop) != 2 or not all(v >= 1 and float(v).is_integer() for v in cfg.seg_crop)):
        raise ConfigError(f"seg_crop must be two whole numbers HEIGHT,WIDTH >= 1, got {_short(cfg.seg_crop)}")
    if len(cfg.seg_scales) != 2 or not 0 < cfg.seg_scales[0] <= cfg.seg_scales[1] <= 8:
        raise ConfigError(f"seg_scales must be LOW,HIGH with 0 < LOW <= HIGH <= 8, got {_short(cfg.seg_scales)}")
    for name in ("image_size", "eval_image_size"):
        size_pair(getattr(cfg, name), name)
    _check_store_options(cfg)
    _check_store_augments(cfg)
    for check in TASK_CHECKS:  # the task exists; the options it cannot use (augment names, classification-only)
        check(cfg)
    for name in ("model", "data", "out", "resume", "cache_dir"):
        value = getattr(cfg, name)
        if value is not None and "\0" in value:
            raise ConfigError(f"{name} must not contain NUL characters, got {_short(value)}")


def size_pair(value: int | list[int] | tuple[int, ...] | None, name: str = "image_size") -> tuple[int, int] | None:
    """An image size option (N, or [H, W]) as (height, width); ConfigError for anything else."""
    if value is None:
        return None
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIZE for v in pair)):
        raise ConfigError(f"{name} must be N or H W (one or two whole numbers in 1..{MAX_IMAGE_SIZE}), "
                          f"got {_short(value)}: e.g. --{name.replace('_', '-')} 224 or --{name.replace('_', '-')} 192 256")
    return int(pair[0]), int(pair[1])


def _check_store_options(cfg: TrainConfig) -> None:
    """--store-size, --crop-pct, --rrc-scale, --rrc-ratio and --eval-image-size: their ranges, and the data
    they apply to."""
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {cfg.crop_pct}: e.g. 0.875 resizes 224 to 256 "
                          "before the centre crop")
    if cfg.interpolation is not None:
        from convforge.data.views import check_interpolation

        check_interpolation(cfg.interpolation)
    if len(cfg.rrc_scale) != 2 or not 0 < cfg.rrc_scale[0] <= cfg.rrc_scale[1] <= 1:
        raise ConfigError(f"rrc_scale must be LOW HIGH with 0 < LOW <= HIGH <= 1 (fractions of the image area), "
                          f"got {_short(cfg.rrc_scale)}")
    if len(cfg.rrc_ratio) != 2 or not 0 < cfg.rrc_ratio[0] <= cfg.rrc_ratio[1] <= MAX_RRC_RATIO:
        raise ConfigError(f"rrc_ratio must be LOW HIGH with 0 < LOW <= HIGH <= {MAX_RRC_RATIO:g} (aspect ratios "
                          f"width / height of the crops), got {_short(cfg.rrc_ratio)}: e.g. --rrc-ratio 0.75 1.3333")
    if cfg.store_size is None:
        changed = [name for name, default in (("crop_pct", None), ("interpolation", None), ("rrc_scale", [0.08, 1.0]),
                                              ("rrc_ratio", list(DEFAULT_RRC_RATIO)), ("eval_image_size", None),
                                              ("randaugment", list(DEFAULT_RANDAUGMENT)),
                                              ("progressive_resize", None))
                   if getattr(cfg, name) != default]
        if changed:
            raise ConfigError(f"{', '.join(changed)}: only for image-store data: add --store-size N "
                              "(with --data imagefolder:DIR or wds:DIR)")
        if cfg.data.strip().lower().startswith("wds:"):
            raise ConfigError("--data wds:DIR (WebDataset shards) needs --store-size N: the shorter side the "
                              "images are decoded to, as for image stores")
        return
    if not cfg.data.strip().lower().startswith(("imagefolder:", "wds:")):
        raise ConfigError(f"--store-size needs --data imagefolder:DIR (an image folder of any image sizes) or "
                          f"wds:DIR (WebDataset tar shards), got {_short(cfg.data)}")


def resolve_store_size(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """``cfg`` with ``store_size: auto`` replaced by the smallest store that no crop is upscaled from at full
    scale: the larger of the training crop and the evaluation resize (eval size / crop_pct, e.g. 128 -> 146,
    224 -> 256), over both sides; and a note saying so (None when there was nothing to choose)."""
    from convforge.data.photos import DEFAULT_IMAGE_SIZE
    from convforge.data.views import DEFAULT_CROP_PCT, eval_resize_size

    if cfg.store_size != AUTO:
        return cfg, None
    crop = size_pair(cfg.image_size) or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    evaluated = size_pair(cfg.eval_image_size) or crop
    resize = eval_resize_size(evaluated, cfg.crop_pct or DEFAULT_CROP_PCT)
    size = max(*crop, *resize)
    note = (f"--store-size auto: {size} (images kept with their shorter side at most {size} px: the "
            f"{'x'.join(map(str, crop))} training crop, the {'x'.join(map(str, resize))} evaluation resize)")
    return dataclasses.replace(cfg, store_size=size), note


def _check_store_augments(cfg: TrainConfig) -> None:
    """--randaugment N M (with --augment rrc-flip-ra) and --progressive-resize S E0 E1 (store data)."""
    from convforge.data.randaugment import check_randaugment

    if len(cfg.randaugment) != 2:
        raise ConfigError(f"randaugment must be N M (ops per image, magnitude level 0..30), got "
                          f"{_short(cfg.randaugment)}: e.g. --randaugment 2 9")
    check_randaugment(*cfg.randaugment)
    if cfg.randaugment != list(DEFAULT_RANDAUGMENT) and cfg.augment != "rrc-flip-ra":
        raise ConfigError(f"randaugment {_short(cfg.randaugment)} is RandAugment's setting: add --augment rrc-flip-ra "
                          f"(with --store-size), got augment {_short(cfg.augment)}")
    if cfg.progressive_resize is not None:
        _check_progressive_resize(cfg)


def _check_progressive_resize(cfg: TrainConfig) -> None:
    """START_SIZE START_EPOCH END_EPOCH: a start size on the rounding grid below the crop, epochs in order."""
    from convforge.data.photos import DEFAULT_IMAGE_SIZE
    from convforge.data.store_loader import progressive_step

    values = cfg.progressive_resize or []
    if len(values) != 3:
        raise ConfigError(f"progressive_resize must be START_SIZE START_EPOCH END_EPOCH, got {_short(values)}: "
                          "e.g. --progressive-resize 160 10 30 (160 px up to epoch 10, image_size from epoch 30)")
    start, first, last = values
    crop = size_pair(cfg.image_size) or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    step = progressive_step(crop)
    if not step <= start <= min(crop) or start % step:
        raise ConfigError(f"progressive_resize START_SIZE must be a multiple of {step} (the rounding step for "
                          f"image_size {crop[0]}x{crop[1]}) in {step}..{min(crop)}, got {start}")
    if not 1 <= first < last <= cfg.epochs:
        raise ConfigError(f"progressive_resize epochs must be 1 <= START_EPOCH < END_EPOCH <= epochs ({cfg.epochs}), "
                          f"counted from 1, got {first} {last}")


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
            raise ConfigError(f"{source}: unknown option {_short(key)}{hint}")
        out[name] = _coerce(value, hints[name], f"{source}: option {_short(key)}")
    return out


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters (a message must not print a whole document)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. a recursive structure too deep to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_plain(value: Any, where: str) -> None:
    """``value`` must be JSON-like (it is written into config.yaml and checkpoint metadata): None, bool,
    int, finite float, str, lists and string-keyed mappings of them, not too deep or too large."""
    stack = [(value, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > _MODEL_ARGS_MAX_DEPTH or seen > _MODEL_ARGS_MAX_ITEMS:
            raise ConfigError(f"{where} is nested too deeply or too large (a recursive YAML alias?)")
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise ConfigError(f"{where}: key {_short(key)} must be a string")
                stack.append((sub, depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, depth + 1) for sub in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where}: {item} is not a finite number")
        elif item is not None and not isinstance(item, (bool, int, float, str)):
            raise ConfigError(
                f"{where}: {_short(item)} ({type(item).__name__}) is not a plain value: use numbers, strings, "
                f"true/false, lists or mappings (quote dates and other YAML types)"
            )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where} may not be empty")
    if "int | str" in text:  # store_size: N or auto
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer or {AUTO}, got {_short(value)}")
        return value
    if "int | list[int]" in text:  # a size: N stays N ([N] too), [H, W] a list of integers
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if "list[" in text:
        item_hint = "float" if "list[float]" in text else "int" if "list[int]" in text else "str"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or len(value) > 64:
            raise ConfigError(f"{where} must be a list (at most 64 items), got {_short(value)}")
        return [_coerce(item, item_hint, f"{where} item {i + 1}") for i, item in enumerate(value)]
    if "dict" in text:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {_short(value)}")
        _check_plain(value, where)
        return value
    if "bool" in text:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {_short(value)}")
    if "int" in text and "float" not in text:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_short(value)}")
        return value
    if "float" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_short(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{where} is too large, got {_short(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {number}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {_short(value)}")
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
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. a date like 2024-13-45
        raise ConfigError(f"{path} is not valid YAML: {type(exc).__name__}: {_short(str(exc), 300)}") from None
    return coerce_fields(values or {}, str(path))


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
