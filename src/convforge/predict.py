"""Deprecated: the evaluation and inference API is :mod:`convforge.train.inference`.

These names remain for callers not yet switched (compress/pipeline.py); delete this module once none is left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from convforge.data import Dataset
from convforge.train.inference import LoadedModel, align_split, load_data, predict

__all__ = ["align_split", "load_data_for", "predict_images"]


def load_data_for(spec: str, image_size: int | None = None, skip_bad_images: bool = False) -> Dataset:
    """:func:`convforge.train.inference.load_data`."""
    return load_data(spec, image_size, skip_bad_images)


def predict_images(ckpt: Any, paths: Sequence[str | Path], top_k: int = 5, tta: bool = False) -> list[dict]:
    """:func:`convforge.train.inference.predict` of a Checkpoint on image files."""
    loaded = ckpt if isinstance(ckpt, LoadedModel) else LoadedModel(ckpt.model, dict(ckpt.meta), ckpt.path)
    return predict(loaded, paths, top_k=top_k, tta=tta)
