"""One evaluation and inference API for every task: load a model from any source, evaluate it, predict images.

A model source is a convforge checkpoint (file, ``.json`` sidecar or run directory), a registry
name (fresh, untrained weights) or a registry name with a foreign weight file. :func:`load_model`
turns any of them into a :class:`LoadedModel`; :func:`evaluate` scores it on data as
``convforge eval`` prints it; :func:`predict` runs it on image files or uint8 images, per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from convforge.data import Dataset, Split
from convforge.data.dataset import convert_channels
from convforge.data.photos import recorded_interpolation
from convforge.errors import ConfigError, ConvforgeError, DataError
from convforge.models import list_models
from convforge.train.checkpoint import Checkpoint, load_checkpoint

# The command that predicts with a model of each task.
TASK_COMMANDS = {"classify": "predict", "segment": "segment", "super-resolve": "upscale"}


@dataclass
class LoadedModel(Checkpoint):
    """A model ready for inference and what is known about it: a loaded checkpoint, or a registry model
    (``path`` None) with fresh or foreign weights, described in the shape of a checkpoint's metadata.

    ``normalization`` is absent when foreign weights came without ``mean``/``std`` (``mean``/``std``
    are then None and :func:`evaluate` uses the data's, with a note).
    """

    source: str = "checkpoint"  # checkpoint | registry | weights
    weights: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.meta["model"]["name"]

    @property
    def task(self) -> str:
        return self.meta.get("task", "classify")

    @property
    def mean(self) -> tuple[float, ...] | None:  # type: ignore[override]
        norm = self.meta.get("normalization")
        return tuple(norm["mean"]) if norm else None

    @property
    def std(self) -> tuple[float, ...] | None:  # type: ignore[override]
        norm = self.meta.get("normalization")
        return tuple(norm["std"]) if norm else None

    @property
    def data_spec(self) -> str | None:
        return (self.meta.get("data") or {}).get("spec") or None

    @property
    def trained_image_size(self) -> int | None:
        """The ``--image-size`` the model was trained with (image folders resized to it), if any."""
        return self.meta.get("image_size") or (self.meta.get("recipe") or {}).get("image_size")

    @property
    def label(self) -> str:
        """The checkpoint path, the weight file or the registry name."""
        return str(self.path) if self.path else (self.weights or self.name)


def as_loaded(ckpt: Checkpoint) -> LoadedModel:
    """``ckpt`` as a LoadedModel (itself when it is one already); the metadata is copied, not shared."""
    return ckpt if isinstance(ckpt, LoadedModel) else LoadedModel(ckpt.model, dict(ckpt.meta), ckpt.path)


def is_checkpoint_path(source: str | Path) -> bool:
    """Whether ``source`` names a checkpoint (an existing path or a .safetensors/.json name), not a model name."""
    return Path(source).exists() or str(source).endswith((".safetensors", ".json"))


def load_model(
    source: str | Path | None = None,
    *,
    model: str | None = None,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    in_chans: int | None = None,
    model_args: dict[str, Any] | None = None,
    image_size: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load a model from a checkpoint or registry name (``source``), or ``model=NAME, weights=FILE``.

    ``mean``/``std`` override a checkpoint's normalisation and describe foreign weights; ``num_classes``,
    ``classes``, ``in_chans``, ``model_args`` and ``image_size`` describe a registry model.
    """
    if source is not None and (model or weights):
        raise ConfigError("give either CKPT or --model NAME --weights FILE, not both")
    if weights and not model:
        raise ConfigError(f"--weights {weights} needs --model NAME: the architecture the file was saved from")
    if (mean is None) != (std is None):
        raise ConfigError("give both --mean and --std, or neither")
    if source is not None and is_checkpoint_path(source):
        ckpt = load_checkpoint(source, device=device)
        loaded = as_loaded(ckpt)
        if mean is not None:
            _check_norm(mean, std, loaded.input_size[0])
            loaded.meta["normalization"] = {"mean": list(mean), "std": list(std)}  # type: ignore[arg-type]
        return loaded
    name = model or (str(source) if source is not None else None)
    if not name:
        raise ConfigError("give a checkpoint (CKPT), or --model NAME and --weights FILE")
    if model is None and name not in list_models():
        raise ConvforgeError(f"{name!r} is neither a checkpoint file nor a model name; see `convforge models`")
    return _registry_model(name, weights, mean, std, num_classes, classes, in_chans, model_args or {}, image_size,
                           device, seed)


def _check_norm(mean: Sequence[float], std: Sequence[float] | None, channels: int) -> None:
    if len(mean) != channels or std is None or len(std) != channels:
        raise ConfigError(f"normalisation needs {channels} mean and std values, got mean={list(mean)} "
                          f"std={list(std or [])}")


def _registry_model(name: str, weights: str | Path | None, mean: Sequence[float] | None,
                    std: Sequence[float] | None, num_classes: int | None, classes: Sequence[str] | None,
                    in_chans: int | None, model_args: dict[str, Any], image_size: int | Sequence[int] | None,
                    device: str | torch.device, seed: int) -> LoadedModel:
    from convforge.models import create_model, load_foreign_weights, model_info

    info = model_info(name)  # an unknown name: an error that suggests the closest ones
    channels = in_chans or info.input_size[0]
    count = num_classes or (len(classes) if classes else info.num_classes)
    if classes is not None and len(classes) != count:
        classes = None
    with torch.random.fork_rng(devices=[]):  # a seeded init without touching the caller's random state
        torch.manual_seed(seed)
        net = create_model(name, num_classes=count, in_chans=channels, **model_args)
    notes = []
    if weights:
        load_foreign_weights(net, weights)
    else:
        notes.append(f"{name}: fresh, untrained weights (seed {seed}); pass --weights FILE or a checkpoint "
                     f"for a trained model")
    height, width = _size_pair(image_size) or tuple(info.input_size[1:])
    meta: dict[str, Any] = {
        "task": getattr(net, "task", "classify"),
        "model": {"name": name, "num_classes": count, "in_chans": channels, "args": dict(model_args)},
        "classes": list(classes) if classes else [str(i) for i in range(count)],
        "input_size": [channels, height, width],
    }
    if mean is not None:
        _check_norm(mean, std, channels)
        meta["normalization"] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std or ()]}
    if meta["task"] == "super-resolve" and hasattr(net, "scale"):
        meta["scale"] = int(net.scale)
    return LoadedModel(net.to(device).eval(), meta, None, "weights" if weights else "registry",
                       str(weights) if weights else None, notes)


def _size_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def classes_for(data: Dataset, num_classes: int | None) -> list[str]:
    """The class names of a model for ``data``: the data's, or ``0..N-1`` when the model has another count."""
    if not num_classes or num_classes == data.num_classes:
        return list(data.classes)
    return [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------- data


def load_data(spec: str, image_size: int | Sequence[int] | None = None, skip_bad_images: bool = False) -> Dataset:
    """Load a classification data spec, with progress on stderr."""
    from convforge.data import load
    from convforge.progress import echo

    size = tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size
    return load(spec, image_size=size, skip_bad_images=skip_bad_images, log=echo)


def align_split(split: Split, data_classes: Sequence[str], model_classes: Sequence[str], in_chans: int,
                notes: list[str]) -> Split:
    """Map the dataset's labels onto the model's class order and convert channels, noting what changed."""
    labels = split.labels
    if list(data_classes) != list(model_classes):
        if sorted(data_classes) != sorted(model_classes):
            raise DataError(
                f"the data's classes ({', '.join(data_classes[:12])}) are not the model's "
                f"({', '.join(model_classes[:12])}); evaluate on data with the same class folders"
            )
        position = {name: i for i, name in enumerate(model_classes)}
        labels = torch.tensor([position[name] for name in data_classes])[labels]
        notes.append("the data lists the model's classes in another order; labels were remapped by name")
    images = split.images
    if images.shape[1] != in_chans:
        notes.append(f"converted {images.shape[1]}-channel images to the model's {in_chans} channels")
        images = convert_channels(images, in_chans)
    return Split(images, labels)


def aligned_split(loaded: Any, data: Dataset, split: str = "test", notes: list[str] | None = None) -> Split:
    """One split of ``data`` in ``loaded``'s class order and channel count (a Checkpoint or a LoadedModel)."""
    if split not in ("train", "val", "test") or getattr(data, split, None) is None:
        raise ConfigError(f"dataset {data.spec!r} has no {split!r} split")
    return align_split(data.split(split), data.classes, loaded.classes, loaded.input_size[0],
                       notes if notes is not None else [])


def normalization_for(loaded: LoadedModel, data: Dataset, notes: list[str]) -> tuple[tuple, tuple]:
    """``loaded``'s mean and std, else the data's (repeated to the model's channels) with a note."""
    if loaded.mean is not None:
        return loaded.mean, loaded.std  # type: ignore[return-value]
    channels = loaded.input_size[0]
    mean, std = tuple(data.mean), tuple(data.std)
    if len(mean) != channels:
        mean, std = (mean * channels)[:channels], (std * channels)[:channels]
    notes.append("no --mean/--std given: using the statistics measured on this data's train split; "
                 "foreign weights usually expect the normalisation they were trained with")
    return mean, std


# ---------------------------------------------------------------- evaluation


def evaluate(
    loaded: LoadedModel,
    data: str | Dataset | None = None,
    split: str = "test",
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tta: bool = False,
    image_size: int | Sequence[int] | None = None,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Score ``loaded`` on ``data`` (a spec or a loaded dataset; default: the checkpoint's own data at its
    trained image size). Classification: top-1/top-5/loss/per-class/confusion; other tasks: their metrics
    per evaluation split (``split="test"``: every evaluation split of the task)."""
    if loaded.task != "classify":
        return _evaluate_dense(loaded, data, split, batch_size, device, tta)
    if data is None:
        data = loaded.data_spec
        if not data:
            raise ConfigError("the checkpoint names no data; pass --data SPEC")
    if isinstance(data, str):
        data = load_eval_data(loaded, data, image_size, skip_bad_images)
    notes: list[str] = list(loaded.notes) + list(data.notes)
    mean, std = normalization_for(loaded, data, notes)
    if getattr(data, "has_crop_views", False):
        result = _evaluate_store(loaded, data, split, mean, std, notes, batch_size, device, tta)
    else:
        from convforge.train.evaluate import evaluate as evaluate_split

        part = aligned_split(loaded, data, split, notes)
        result = evaluate_split(loaded.model, part, mean, std, batch_size=batch_size, device=device, tta=tta,
                                num_classes=len(loaded.classes), details=True)
    result.update({"data": data.spec, "split": split, "tta": tta, "classes": loaded.classes,
                   "mean": list(mean), "std": list(std), "notes": notes, "model": loaded.name})
    result["checkpoint" if loaded.path else "weights" if loaded.weights else "source"] = loaded.label
    return result


def load_eval_data(loaded: LoadedModel, spec: str, image_size: int | Sequence[int] | None = None,
                   skip_bad_images: bool = False) -> Any:
    """The data :func:`evaluate` scores ``loaded`` on for ``spec``: image stores evaluated as the checkpoint's
    ``preprocess`` records (an image folder or WebDataset shards and a store- or shard-trained model), else the
    data at ``image_size`` or the model's trained image size (or crop)."""
    preprocess = loaded.meta.get("preprocess")
    if preprocess and spec.strip().lower().startswith(("imagefolder:", "wds:")):
        return load_store_data(spec, preprocess, image_size, skip_bad_images)
    crop = preprocess["crop"] if preprocess else loaded.trained_image_size
    return load_data(spec, image_size or crop, skip_bad_images)


def load_store_data(spec: str, preprocess: dict[str, Any], image_size: int | Sequence[int] | None = None,
                    skip_bad_images: bool = False) -> Any:
    """``spec`` as image stores, evaluated as a checkpoint's ``preprocess`` records (``image_size``: another crop)."""
    from convforge.data import load
    from convforge.progress import echo

    crop = _size_pair(image_size) or tuple(preprocess["crop"])
    return load(spec, image_size=crop, skip_bad_images=skip_bad_images, log=echo,
                store_size=int(preprocess["store_size"]), crop_pct=float(preprocess["crop_pct"]),
                interpolation=recorded_interpolation(preprocess))


def _evaluate_store(loaded: LoadedModel, data: Any, split: str, mean: Sequence[float], std: Sequence[float],
                    notes: list[str], batch_size: int, device: str | torch.device, tta: bool) -> dict[str, Any]:
    """Classification metrics of ``loaded`` on one split of image-store data (resize + centre crop views)."""
    from convforge.train.evaluate import evaluate as evaluate_split

    _check_store_fits(loaded, data, split)
    return evaluate_split(loaded.model, data.split(split), mean, std, view=data.eval_view,
                          batch_size=batch_size, device=device, tta=tta, num_classes=len(loaded.classes),
                          details=True)


def _check_store_fits(loaded: LoadedModel, data: Any, split: str) -> None:
    """A clear error unless ``data`` (image stores) has ``split`` and the model's classes, in order, and channels."""
    if split not in ("train", "val", "test") or getattr(data, split, None) is None:
        raise ConfigError(f"dataset {data.spec!r} has no {split!r} split")
    if list(data.classes) != list(loaded.classes):
        raise DataError(f"the data's classes ({', '.join(data.classes[:12])}) are not the model's "
                        f"({', '.join(loaded.classes[:12])}) in the same order; evaluate on data with the same "
                        "class folders")
    if data.channels != loaded.input_size[0]:
        raise DataError(f"the data has {data.channels}-channel images, the model takes {loaded.input_size[0]}")


def view_images(data: Any, split: str, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, h, w) evaluation views of images ``indices`` of one split of ``data`` in the data's own
    channels: a fixed-size split's images as they are, an image store's resized and centre-cropped as
    :func:`evaluate` sees them (``data.eval_view``: the evaluation crop, ``crop_pct`` and filter)."""
    part = data.split(split)
    if not getattr(data, "is_store", False):
        return part.images[torch.as_tensor(indices, dtype=torch.long)]
    from convforge.data.views import resize_center_crop_batch

    images = [part.image(int(i)) for i in indices]
    if not images:
        return torch.zeros(0, data.channels, *data.eval_view.size, dtype=torch.uint8)
    return resize_center_crop_batch(images, *data.eval_view)


def eval_views(loaded: LoadedModel, data: Any, split: str = "test", notes: list[str] | None = None,
               batch_size: int = 256, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(uint8 images, labels)`` of one split as :func:`evaluate` scores ``loaded`` on it, in split
    order (the first ``limit`` images only, when given): labels in the model's class order, images at its
    channel count; image stores give their evaluation views (the checkpoint's resize + centre crop)."""
    notes = notes if notes is not None else []
    if getattr(data, "is_shards", False):
        _check_store_fits(loaded, data, split)
        yield from _shard_views(data, split, batch_size, limit)
        return
    if getattr(data, "is_store", False):
        _check_store_fits(loaded, data, split)
        labels = data.split(split).labels
    else:
        part = aligned_split(loaded, data, split, notes)
        labels = part.labels
    count = len(labels) if limit is None else min(limit, len(labels))
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        if getattr(data, "is_store", False):
            images = view_images(data, split, range(start, stop))
        else:
            images = part.images[start:stop]
        yield images, labels[start:stop]


def _shard_views(data: Any, split: str, batch_size: int,
                 limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 evaluation views and labels of one split of shard data, streamed in shard order."""
    view = data.eval_view
    identity = ([0.0] * data.channels, [1 / 255] * data.channels)  # normalised values = the uint8 pixels
    left = limit
    for x, y in data.split(split).loader(batch_size, *identity, image_size=view.size, crop_pct=view.crop_pct,
                                         interpolation=view.interpolation):
        if left is not None:
            x, y, left = x[:left], y[:left], left - len(y[:left])
        if len(y):
            yield x.round().clamp_(0, 255).to(torch.uint8), y
        if left == 0:
            return


def dense_data(loaded: LoadedModel, spec: str | None = None, batch_size: int = 16,
               image_size: int | None = None) -> tuple[Any, Any, Any]:
    """(task, config, data) to evaluate a segmentation or super-resolution model on its own data (or ``spec``)."""
    from convforge.config import TrainConfig
    from convforge.train.tasks import get_task

    task = get_task(loaded.task)
    recipe = dict(loaded.meta.get("recipe") or {})
    spec = spec or loaded.data_spec
    if not spec:
        raise ConfigError(f"{loaded.label} names no data; pass --data SPEC")
    cfg = TrainConfig(task=task.name, data=spec, batch_size=batch_size,
                      scale=int(loaded.meta.get("scale") or recipe.get("scale") or 3),
                      image_size=image_size or recipe.get("image_size"))
    return task, cfg, task.load_data(cfg, lambda message: None)


def _evaluate_dense(loaded: LoadedModel, data: Any, split: str, batch_size: int, device: str | torch.device,
                    tta: bool) -> dict[str, Any]:
    if data is None or isinstance(data, str):
        task, cfg, dataset = dense_data(loaded, data, batch_size)
    elif isinstance(data, tuple):  # what dense_data returned, when the caller has it already
        task, cfg, dataset = data
    else:
        from convforge.config import TrainConfig
        from convforge.train.tasks import get_task

        task, dataset = get_task(loaded.task), data
        cfg = TrainConfig(task=task.name, data=data.spec, batch_size=batch_size, scale=getattr(data, "scale", 3))
    splits = task.eval_splits(dataset) if split == "test" else [split]
    result: dict[str, Any] = {"checkpoint": loaded.label, "model": loaded.name, "task": task.name,
                              "data": cfg.data, "notes": list(loaded.notes)}
    if tta:
        result["notes"].append(f"flip TTA is not applied to {task.name} evaluation")
    for name in splits:
        try:
            result[name] = task.evaluate(loaded.model, dataset, name, cfg, torch.device(device), 0, 1)
        except KeyError:
            raise ConvforgeError(f"{cfg.data} has no {name!r} split") from None
    return result


# ---------------------------------------------------------------- prediction


def load_images(paths: Sequence[str | Path], size: tuple[int, int] | None = None,
                channels: int | None = None) -> list[torch.Tensor]:
    """Decode image files into uint8 (C, H, W) tensors, resized to ``size`` and converted to ``channels``."""
    from convforge.data.imagefolder import decode_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"image not found: {path}")
        image = torch.from_numpy(decode_image(str(path), size)).permute(2, 0, 1).contiguous()
        images.append(convert_channels(image[None], channels)[0] if channels else image)
    return images


def predict(loaded: LoadedModel, images: Sequence[str | Path | torch.Tensor], *, top_k: int = 5,
            tta: bool = False, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Per image: classify: ``top`` (k classes with probabilities); segment: ``mask`` (uint8 H x W class
    indices) and ``class_shares`` (percent of pixels); super-resolve: ``output`` (uint8 upscaled image)."""
    if loaded.mean is None and loaded.task != "super-resolve":
        raise ConfigError(f"{loaded.label} has no normalisation: pass --mean and --std")
    names = [str(i) if isinstance(i, (str, Path)) else f"#{n}" for n, i in enumerate(images)]
    if loaded.task == "classify":
        return _predict_classes(loaded, images, names, top_k, tta, device)
    decoded = [i if isinstance(i, torch.Tensor) else load_images([i])[0] for i in images]
    if loaded.task == "segment":
        return [{"image": name, **segment(loaded, image, tta=tta, device=device)}
                for name, image in zip(names, decoded)]
    if loaded.task == "super-resolve":
        from convforge.data.superres import upscale_rgb

        scale = int(loaded.meta.get("scale") or getattr(loaded.model, "scale"))
        upsampled = bool(getattr(loaded.model, "upsampled_input", False))
        return [{"image": name, "scale": scale, "output": upscale_rgb(loaded.model, image, scale, upsampled, device)}
                for name, image in zip(names, decoded)]
    raise ConfigError(f"no prediction for task {loaded.task!r}; use `convforge eval`")


def class_probabilities(loaded: LoadedModel, images: torch.Tensor, *, batch_size: int = 256, tta: bool = False,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax probabilities (N, classes) of uint8 (N, C, H, W) ``images`` (at the model's channel count)."""
    from convforge.data import normalize
    from convforge.train.evaluate import predict_logits

    if loaded.mean is None:
        raise ConfigError(f"{loaded.label} has no normalisation: pass --mean and --std")
    parts = [predict_logits(loaded.model, normalize(images[i:i + batch_size], loaded.mean, loaded.std).to(device),
                            tta=tta).softmax(dim=1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, len(loaded.classes))


def _predict_classes(loaded: LoadedModel, images: Sequence[Any], names: list[str], top_k: int, tta: bool,
                     device: str | torch.device) -> list[dict[str, Any]]:
    channels, height, width = loaded.input_size
    paths = [i for i in images if not isinstance(i, torch.Tensor)]
    preprocess = loaded.meta.get("preprocess")
    if preprocess:  # trained on image stores: the evaluation view (aspect kept, resize + centre crop)
        from convforge.data.photos import photo_view

        decoded = iter([photo_view(path, preprocess, channels) for path in paths])
    else:
        decoded = iter(load_images(paths, (height, width), channels))
    batch = torch.stack([convert_channels(i[None], channels)[0] if isinstance(i, torch.Tensor) else next(decoded)
                         for i in images])
    probs = class_probabilities(loaded, batch, tta=tta, device=device)
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    classes = loaded.classes
    return [{"image": name, "top": [{"class": classes[int(i)], "index": int(i), "probability": float(p)}
                                    for p, i in zip(top.values[row], top.indices[row])]}
            for row, name in enumerate(names)]


@torch.no_grad()
def segment(loaded: LoadedModel, image: torch.Tensor, *, tta: bool = False,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """The class mask (uint8 H x W) of one uint8 (C, H, W) image and each present class's share of pixels."""
    from convforge.data import normalize

    x = normalize(convert_channels(image[None], loaded.input_size[0]), loaded.mean, loaded.std).to(device)
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        logits = loaded.model(x).float()
        if tta:
            logits = 0.5 * (logits + loaded.model(x.flip(3)).float().flip(3))
    finally:
        loaded.model.train(was_training)
    if logits.ndim != 4 or logits.shape[1] > 256:
        raise ConvforgeError(f"{loaded.label} returned {tuple(logits.shape)}, not (1, K <= 256, H, W) logits")
    if logits.shape[-2:] != image.shape[-2:]:
        logits = nn.functional.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    mask = logits.argmax(1)[0].to(torch.uint8).cpu()
    counts = torch.bincount(mask.flatten().long(), minlength=len(loaded.classes))
    shares = {name: round(100.0 * int(counts[i]) / mask.numel(), 2) for i, name in enumerate(loaded.classes)
              if counts[i]}
    return {"mask": mask, "class_shares": shares}


def require_task(loaded: LoadedModel, task: str) -> None:
    """A clear error when ``loaded`` is a model of another task, naming the command to use."""
    if loaded.task != task:
        command = TASK_COMMANDS.get(loaded.task, "eval")
        raise ConvforgeError(f"{loaded.label} is a {loaded.task} checkpoint, not a {task} one: "
                             f"use `convforge {command}`")


# ---------------------------------------------------------------- import


def save_loaded(loaded: LoadedModel, path: str | Path, data: Dataset | None = None) -> Path:
    """Write ``loaded`` as a self-describing convforge checkpoint (safetensors + JSON sidecar): task, classes,
    input size, normalisation (``data``'s when ``loaded`` has none), data spec and the source weight file."""
    from convforge.train.checkpoint import save_checkpoint

    meta = {key: value for key, value in loaded.meta.items() if key not in ("format", "format_version",
                                                                            "convforge_version", "created")}
    if "normalization" not in meta:
        if data is None:
            raise ConfigError(f"{loaded.label}: give --mean and --std (or --data SPEC to measure them): a "
                              f"checkpoint records the normalisation its model expects")
        notes: list[str] = []
        mean, std = normalization_for(loaded, data, notes)
        meta["normalization"] = {"mean": list(mean), "std": list(std)}
        meta.setdefault("notes", []).extend(notes)
    if data is not None:
        meta["data"] = {"spec": data.spec, "train": len(data.train) if data.train is not None else 0,
                        "test": len(data.test) if getattr(data, "test", None) is not None else 0}
    meta["imported_from"] = loaded.weights or f"{loaded.name} (fresh, untrained weights)"
    meta["weights"] = "imported" if loaded.weights else "untrained"
    return save_checkpoint(path, loaded.model, meta)
