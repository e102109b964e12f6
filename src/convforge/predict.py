"""Evaluating checkpoints and foreign weights on a dataset, and predicting single images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from convforge.data import Dataset, Split, load
from convforge.data.dataset import convert_channels
from convforge.data.imagefolder import decode_image
from convforge.errors import ConfigError, DataError
from convforge.train.checkpoint import Checkpoint
from convforge.train.evaluate import evaluate, predict_logits


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
        mapping = torch.tensor([position[name] for name in data_classes])
        labels = mapping[labels]
        notes.append("the data lists the model's classes in another order; labels were remapped by name")
    images = split.images
    if images.shape[1] != in_chans:
        notes.append(f"converted {images.shape[1]}-channel images to the model's {in_chans} channels")
        images = convert_channels(images, in_chans)
    return Split(images, labels)


def evaluate_model(
    model: nn.Module,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int,
    data: Dataset,
    split: str = "test",
    tta: bool = False,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy and confusion matrix of ``model`` on one split of ``data``."""
    notes: list[str] = list(data.notes)
    if split not in ("train", "val", "test") or getattr(data, split) is None:
        raise ConfigError(f"dataset {data.spec!r} has no {split!r} split")
    part = align_split(data.split(split), data.classes, classes, in_chans, notes)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(f"normalisation needs {in_chans} mean and std values, got mean={list(mean)} std={list(std)}")
    result = evaluate(model, part, mean, std, batch_size=batch_size, device=device, tta=tta,
                      num_classes=len(classes), details=True)
    result.update({"data": data.spec, "split": split, "tta": tta, "classes": list(classes),
                   "mean": list(mean), "std": list(std), "notes": notes})
    return result


def load_images(paths: Sequence[str | Path], size: tuple[int, int], channels: int) -> torch.Tensor:
    """Decode image files into a uint8 (N, C, H, W) batch at ``size``, converted to ``channels``."""
    arrays = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"image not found: {path}")
        array = decode_image(str(path), size)  # raises DataError naming the file
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
        arrays.append(convert_channels(tensor, channels))
    return torch.cat(arrays)


def predict_images(ckpt: Checkpoint, paths: Sequence[str | Path], top_k: int = 5, tta: bool = False) -> list[dict]:
    """Top-k classes with probabilities for each image."""
    from convforge.data import normalize

    channels, height, width = ckpt.input_size
    images = load_images(paths, (height, width), channels)
    x = normalize(images, ckpt.mean, ckpt.std)
    probs = predict_logits(ckpt.model, x, tta=tta).softmax(dim=1)
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [
        {"image": str(path),
         "top": [{"class": ckpt.classes[int(i)], "index": int(i), "probability": float(p)}
                 for p, i in zip(top.values[row], top.indices[row])]}
        for row, path in enumerate(paths)
    ]


def load_data_for(spec: str, image_size: int | None = None, skip_bad_images: bool = False) -> Dataset:
    from convforge.progress import echo

    return load(spec, image_size=image_size, skip_bad_images=skip_bad_images, log=echo)
