"""Start a run from the weights of a trained convforge checkpoint or a foreign weight file (``--init``).

Fine-tuning on the same classes keeps everything; the same classes in another order reorder the
head; other classes get a freshly initialised head (the tensors whose shape depends on the class
count). The model, its arguments and any pruned widths come from the checkpoint, and so does the
normalisation the weights were trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convforge.errors import ConfigError
from convforge.models import PretrainedCfg, create_model, model_info

DEFAULT_MODEL = "smallcnn"  # TrainConfig's default: "no --model given"


@dataclass
class InitWeights:
    model: nn.Module
    model_name: str
    model_args: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict[str, Any]  # carried into the run's checkpoints: "init" (provenance) and "pruned" (widths)
    notes: list[str] = field(default_factory=list)
    binary_state: dict[str, torch.Tensor] = field(default_factory=dict)  # a binary checkpoint's own parameters


def head_tensors(name: str, num_classes: int, in_chans: int, args: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state tensors whose shape depends on the class count, each with those dimensions (e.g. a linear
    head's weight: (0,); FCN's class-to-class upsampling: (0, 1)). Found by building the model on the
    meta device with ``num_classes`` and ``num_classes + 1``."""
    with torch.device("meta"):
        one = create_model(name, num_classes=num_classes, in_chans=in_chans, **args).state_dict()
        other = create_model(name, num_classes=num_classes + 1, in_chans=in_chans, **args).state_dict()
    heads = {}
    for key, tensor in one.items():
        if key in other and tuple(tensor.shape) != tuple(other[key].shape):
            heads[key] = tuple(d for d, (a, b) in enumerate(zip(tensor.shape, other[key].shape)) if a != b)
    return heads


def _has_class_head(task: str) -> bool:
    from convforge.train.tasks import get_task

    return get_task(task).outputs_are_classes


FOREIGN_SUFFIXES = (".pth", ".th", ".pt", ".bin")


def is_foreign_weights(path: str) -> bool:
    """A weight file that convforge did not write: a PyTorch pickle, or a safetensors file without our metadata."""
    file = Path(path)
    if not file.is_file():
        return False
    if file.suffix in FOREIGN_SUFFIXES:
        return True
    if file.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    from convforge.train.checkpoint import META_KEY

    try:
        with safe_open(str(file), framework="pt") as handle:
            return META_KEY not in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: the checkpoint loader reports it
        return False


@dataclass
class PretrainedDefaults:
    """What a run from a foreign weight file takes from its model's registry ``pretrained_cfg``."""

    model: str
    cfg: PretrainedCfg
    taken: list[str]  # the options filled in from the cfg, e.g. "image size 224"
    kept: list[str]  # the run's own options that win over the cfg, e.g. "--crop-pct 0.9"
    store: bool  # image-store data: the cfg's crop and resize apply (else only its mean/std)
    warnings: list[str] = field(default_factory=list)


def pretrained_defaults(config: Any) -> tuple[Any, PretrainedDefaults | None]:
    """``config`` (a TrainConfig) with the registry's pretrained preprocessing where the user set none.

    Only for ``--init`` with a foreign weight file of a model that has a ``pretrained_cfg`` (torchvision
    weights for the ImageNet zoo). On image-store data (``--store-size``) an unset ``image_size`` becomes
    the cfg's crop, an unset ``crop_pct`` its crop / resize and an unset ``interpolation`` its filter; the
    cfg's mean/std are applied by :func:`load_foreign_init`. Returns the config unchanged and None when nothing applies.
    """
    if not config.init or not is_foreign_weights(config.init):
        return config, None
    try:
        cfg = model_info(config.model).pretrained_cfg
    except ConfigError:  # an unknown --model: building it reports the error
        return config, None
    if cfg is None:
        return config, None
    pretrained_model = config.model
    store = config.store_size is not None
    changes: dict[str, Any] = {}
    taken: list[str] = []
    kept: list[str] = []
    if store:
        if config.image_size is None:
            changes["image_size"] = cfg.image_size
            taken.append(f"image size {cfg.image_size}")
        else:
            kept.append(f"--image-size {config.image_size}")
        if config.crop_pct is None:
            changes["crop_pct"] = cfg.crop_pct
            taken.append(f"crop_pct {cfg.crop_pct:.4g} (resize {cfg.resize}, crop {cfg.image_size})")
        else:
            kept.append(f"--crop-pct {config.crop_pct:g}")
        if config.interpolation is None:
            changes["interpolation"] = cfg.interpolation
            taken.append(f"{cfg.interpolation} resizing")
        elif config.interpolation != cfg.interpolation:
            kept.append(f"--interpolation {config.interpolation}")
    config = dataclasses.replace(config, **changes)
    warnings = []
    if store:
        from convforge.config import size_pair
        from convforge.data.views import DEFAULT_CROP_PCT, eval_resize_size

        eval_size = size_pair(config.eval_image_size or config.image_size, "image_size")
        resize = min(eval_resize_size(eval_size, config.crop_pct or DEFAULT_CROP_PCT))
        if isinstance(config.store_size, int) and config.store_size < resize:  # auto: resolved to >= resize
            warnings.append(f"--store-size {config.store_size} is below the {resize} px evaluation resize: "
                            "images are upscaled")
    return config, PretrainedDefaults(pretrained_model, cfg, taken, kept, store, warnings)


def _preprocess_note(pretrained: PretrainedDefaults | None, data: Any) -> tuple[tuple, tuple, str, dict | None]:
    """The normalisation of a run from a foreign file, the line that says where its preprocessing comes
    from, and the ``pretrained`` record its checkpoints carry (None without a registry cfg)."""
    cfg = pretrained.cfg if pretrained is not None else None
    if cfg is None or len(cfg.mean) != data.channels:
        why = "" if cfg is None else f" ({pretrained.model}'s published weights take {len(cfg.mean)} channels)"
        return (tuple(data.mean), tuple(data.std),
                f"--init: a foreign file does not say how its inputs were normalised{why}: using the data's "
                "statistics", None)
    assert pretrained is not None
    source = cfg.weights or "the ImageNet default (no published weights known)"
    parts = [f"mean ({', '.join(f'{v:.3f}' for v in cfg.mean)}), std ({', '.join(f'{v:.3f}' for v in cfg.std)})",
             *pretrained.taken]
    line = f"--init: preprocessing from the registry's pretrained cfg of {pretrained.model} ({source}): " \
           + ", ".join(parts)
    if pretrained.kept:
        line += f"; the run's own {', '.join(pretrained.kept)} kept"
    if not pretrained.store:
        line += f"; add --store-size N (image folders) for its resize {cfg.resize} / crop {cfg.image_size} evaluation"
    line += "".join(f"; {w}" for w in pretrained.warnings)
    record = {"model": pretrained.model, **cfg.as_dict(), "taken": ["mean/std", *pretrained.taken]}
    return tuple(cfg.mean), tuple(cfg.std), line, record


def load_foreign_init(path: str, model: str, task: str, data: Any, model_args: dict[str, Any],
                      pretrained: PretrainedDefaults | None = None) -> InitWeights:
    """A run's model built from ``--model`` with the weights of a foreign file (see ``read_state_dict``).

    A head that does not fit the data's classes stays freshly initialised. The inputs are normalised with
    the mean/std of the model's registry ``pretrained_cfg`` (``pretrained``, from
    :func:`pretrained_defaults`), else with the data's own statistics (the file does not say).
    """
    from convforge.models.weights import load_state_dict_checked, read_state_dict

    from convforge.errors import CheckpointError

    shown = str(Path(path).resolve())
    built = create_model(model, num_classes=data.num_classes, in_chans=data.channels, **model_args)
    model_task = getattr(built, "task", "classify")
    if model_task != task:
        raise ConfigError(f"--model {model} is a {model_task} model; this run is --task {task}")
    state = read_state_dict(path)
    own = built.state_dict()
    heads = head_tensors(model, data.num_classes, data.channels, model_args) if _has_class_head(task) else {}
    replaced = sorted(k for k in heads if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    state.update({k: own[k] for k in replaced})
    try:
        load_state_dict_checked(built, state, shown)
    except CheckpointError as exc:
        if model != DEFAULT_MODEL:
            raise
        raise CheckpointError(f"{exc} --init {shown} is a foreign weight file (no convforge metadata): name its "
                              f"model with --model NAME (and --model-arg KEY=VALUE for its arguments)") from None
    mean, std, line, record = _preprocess_note(pretrained, data)
    notes = [f"--init: weights from the foreign file {shown} ({model})", line]
    if replaced:
        notes.append(f"--init: the file's head ({', '.join(replaced)}) has another class count; a fresh head "
                     f"starts for the {data.num_classes} classes of {data.spec}")
    carried = {"init": {"checkpoint": shown, "model": model, "foreign": True,
                        "head": "reinitialised" if replaced else "kept"}}
    if record is not None:
        carried["init"]["pretrained_cfg"] = record
    return InitWeights(built, model, dict(model_args), mean, std, carried, notes)


def _carried_state(source: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   heads: dict[str, tuple[int, ...]], same: bool, order: torch.Tensor | None, where: str,
                   args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` with the checkpoint's tensors ``source``: a head of other classes stays as built, unless
    ``order`` maps the new classes to the old rows (the same classes in another order)."""
    for key, tensor in state.items():
        if key in heads and not same:
            if order is not None:
                moved = source[key]
                for dim in heads[key]:
                    moved = moved.index_select(dim, order)
                state[key] = moved
            continue  # new classes: the freshly initialised head stays
        if key not in source or source[key].shape != tensor.shape:
            raise ConfigError(f"{where}: tensor {key} has shape {tuple(source.get(key, torch.empty(0)).shape)} "
                              f"in the checkpoint and {tuple(tensor.shape)} in the model built from it "
                              f"(model arguments {args}); give the checkpoint's own model arguments")
        state[key] = source[key]
    return state


def _binary_mode(meta: dict[str, Any]) -> str | None:
    """The --binary mode of a binary checkpoint's metadata (None for any other)."""
    record = meta.get("quantization")
    return str(record.get("mode")) if isinstance(record, dict) and record.get("kind") == "binary" else None


def load_init(path: str, model: str, task: str, data: Any, model_args: dict[str, Any],
              pretrained: PretrainedDefaults | None = None) -> InitWeights:
    """The model of a run started from checkpoint ``path`` on ``data`` (see the module docstring).

    ``model`` is the run's ``--model`` (the default means "take the checkpoint's"); ``model_args`` are
    the run's own model arguments (e.g. a stochastic-depth rate), applied over the checkpoint's;
    ``pretrained``: the registry preprocessing a foreign file's run takes (:func:`pretrained_defaults`).
    """
    from convforge.models.widths import apply_widths
    from convforge.train.checkpoint import load_checkpoint

    if is_foreign_weights(path):
        return load_foreign_init(path, model, task, data, model_args, pretrained)
    ckpt = load_checkpoint(path)
    meta, shown = ckpt.meta, str(ckpt.path.resolve())
    spec = meta["model"]
    if meta.get("task", "classify") != task:
        raise ConfigError(f"--init {shown} is a {meta.get('task', 'classify')} checkpoint; this run is --task {task}")
    if model not in (DEFAULT_MODEL, spec["name"]):
        raise ConfigError(f"--init {shown} holds a {spec['name']!r} model but --model is {model!r}: "
                          f"leave --model out (the model comes from the checkpoint) or give {spec['name']}")
    if spec["in_chans"] != data.channels:
        raise ConfigError(f"--init {shown} takes {spec['in_chans']}-channel images but {data.spec} has "
                          f"{data.channels} channel(s)")
    args = {**spec["args"], **model_args}
    old_classes, new_classes = list(meta.get("classes", [])), list(getattr(data, "classes", []))
    num_classes = data.num_classes
    class_head = _has_class_head(task)  # e.g. a super-resolution model's outputs are channels: no head to replace
    heads = head_tensors(spec["name"], spec["num_classes"], spec["in_chans"], args) if class_head else {}
    same = spec["num_classes"] == num_classes and (old_classes == new_classes or not class_head)
    reordered = not same and sorted(old_classes) == sorted(new_classes) and len(new_classes) == num_classes
    fresh_head = not same and not reordered
    pruned = meta.get("pruned")
    if pruned and fresh_head:  # a pruned head keeps its pruned input width, with one row per new class
        shapes = dict(pruned.get("shapes", {}))
        for key in heads.keys() & shapes.keys():
            shapes[key] = [num_classes if d in heads[key] else n for d, n in enumerate(shapes[key])]
        pruned = {**pruned, "shapes": shapes}
    try:
        built = create_model(spec["name"], num_classes=num_classes, in_chans=spec["in_chans"], **args)
    except ConfigError as exc:
        raise ConfigError(f"--init {shown}: cannot build {spec['name']!r} with {args}: {exc}") from None
    if pruned:
        apply_widths(built, pruned, shown)
        if fresh_head:  # apply_widths leaves resized tensors at zero: initialise the new head as its layers do
            for owner in {k.rpartition(".")[0] for k in heads}:
                module = built.get_submodule(owner)
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    order = torch.tensor([old_classes.index(c) for c in new_classes]) if reordered else None
    binary = _binary_mode(meta)
    source_state = ckpt.model.state_dict()
    if binary:  # a binary checkpoint's real-valued weights, e.g. the first step of two-step binary training
        from convforge.train.binary import latent_state_dict

        source_state = latent_state_dict(ckpt.model)
    state = _carried_state(source_state, built.state_dict(), heads, same, order, f"--init {shown}", args)
    built.load_state_dict(state)
    binary_state = {k: v for k, v in source_state.items() if k not in state} if binary else {}
    head = "kept" if same else "reordered" if reordered else "reinitialised"
    notes = [f"--init: weights from {shown} ({spec['name']}, epoch {meta.get('epoch', '?')})"]
    if binary:
        notes.append(f"--init: the checkpoint is a binary network (--binary {binary}); the run starts from its "
                     "real-valued (latent) weights, and its own --binary setting decides what is binarised")
    if head == "reordered":
        notes.append("--init: the checkpoint has the same classes in another order; its head rows were reordered")
    elif head == "reinitialised":
        notes.append(f"--init: the checkpoint has {spec['num_classes']} other classes; the head "
                     f"({', '.join(sorted(heads))}) starts fresh for the {num_classes} classes of {data.spec}")
    norm = meta["normalization"]
    mean, std = tuple(norm["mean"]), tuple(norm["std"])
    if (mean, std) != (tuple(data.mean), tuple(data.std)):
        notes.append("--init: inputs are normalised with the checkpoint's mean/std, as its weights were trained "
                     f"(mean {', '.join(f'{v:.3f}' for v in mean)}; std {', '.join(f'{v:.3f}' for v in std)})")
    carried: dict[str, Any] = {"init": {"checkpoint": shown, "model": spec["name"], "epoch": meta.get("epoch"),
                                        "metrics": meta.get("metrics", {}), "head": head}}
    if pruned:
        carried["pruned"] = pruned
    return InitWeights(built, spec["name"], args, mean, std, carried, notes, binary_state)
