"""Image folders of any image sizes (``imagefolder:DIR`` with ``--store-size``): one image store per split.

Images are kept at their own aspect ratio (shorter side at most ``store_size``) in a store per split
under the cache directory; training crops RandomResizedCrop views of them and evaluation resizes and
centre-crops (``crop_pct``), both in ``StoreLoader``; evaluation may use another size than training
(``eval_image_size``, FixRes), and checkpoints record the evaluation view (``preprocess``). The dataset object offers what the engine reads
of a fixed-size ``Dataset`` (classes, channels, image size, mean/std, splits, notes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from convforge.data.cache import default_cache_dir
from convforge.data.dataset import SplitsMixin, channel_stats
from convforge.data.imagefolder import list_image_folder
from convforge.data.loader import epoch_permutation
from convforge.data.paths import printable
from convforge.data.store import (
    ImageStore,
    build_store,
    decode_problem,
    decode_upright,
    image_warnings,
    stored_size,
)
from convforge.data.views import (
    EvalView,
    check_interpolation,
    eval_resize_size,
    resize_center_crop,
    resize_center_crop_batch,
)
from convforge.errors import DataError

# --augment values for store data: RandomResizedCrop + flip (+ TrivialAugment or RandAugment), or the
# evaluation view.
PHOTO_AUGMENTS = ("rrc-flip", "rrc-flip-ta", "rrc-flip-ra", "center")
STORE_AUGMENT_OF = {"rrc-flip-ta": "trivialaugment", "rrc-flip-ra": "randaugment"}  # StoreLoader's augment
DEFAULT_IMAGE_SIZE = 128  # the crop size when --image-size is not given
STATS_IMAGES = 2000  # train images the normalisation statistics are measured on
ANTIALIAS_SUFFIX = "-antialias"  # checkpoints record "bilinear-antialias": views.resize_uint8's filters antialias


def recorded_interpolation(preprocess: dict[str, Any]) -> str:
    """The evaluation filter a checkpoint's ``preprocess`` records (bilinear where older ones say nothing)."""
    return str(preprocess.get("interpolation", "bilinear")).removesuffix(ANTIALIAS_SUFFIX)


class CropViewsMixin(SplitsMixin):
    """What image stores and shards share: sizes as (h, w) pairs, the evaluation view, the recorded
    ``preprocess`` and ``describe``; needs ``image_size``, ``eval_image_size``, ``crop_pct``, ``interpolation``,
    ``store_size``, ``channels``, ``mean``/``std`` and the splits."""

    has_crop_views = True  # what tasks and inference test to evaluate through ``eval_view`` and record ``preprocess``
    image_size: tuple[int, int]
    eval_image_size: tuple[int, int] | None
    crop_pct: float
    interpolation: str
    store_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int

    def _pair_sizes(self) -> None:
        check_interpolation(self.interpolation)
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.eval_image_size = (self.image_size if self.eval_image_size is None
                                else (int(self.eval_image_size[0]), int(self.eval_image_size[1])))

    @property
    def first_split(self) -> Any:
        return next(s for s in (self.train, self.val, self.test) if s is not None)  # type: ignore[attr-defined]

    @property
    def eval_view(self) -> EvalView:
        """The evaluation view: resize to size / crop_pct (``interpolation``), centre-crop size."""
        return EvalView(self.eval_image_size or self.image_size, self.crop_pct, self.interpolation)

    def preprocess(self) -> dict[str, Any]:
        """The evaluation transform, as checkpoints record it (``convforge.train.inference`` repeats it);
        ``train_size`` is the training crop, for information."""
        size, crop_pct, interpolation = self.eval_view
        return {"resize": list(eval_resize_size(size, crop_pct)), "crop": list(size), "crop_pct": crop_pct,
                "interpolation": interpolation + ANTIALIAS_SUFFIX, "store_size": self.store_size,
                "train_size": list(self.image_size)}

    def describe(self) -> dict[str, Any]:
        sizes = {name: len(getattr(self, name)) if getattr(self, name) is not None else 0
                 for name in ("train", "val", "test")}
        return {"spec": self.spec, "classes": list(self.classes), "channels": self.channels,
                "image_size": list(self.image_size), "eval_image_size": list(self.eval_view[0]),
                "store_size": self.store_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation, **sizes,
                "mean": [round(m, 6) for m in self.mean], "std": [round(s, 6) for s in self.std]}


@dataclass
class PhotoDataset(CropViewsMixin):
    """A classification dataset of image stores; ``image_size`` is the crop the model is trained on,
    ``eval_image_size`` the one it is evaluated on (default: the same)."""

    spec: str
    classes: list[str]
    train: ImageStore | None
    test: ImageStore
    val: ImageStore | None
    image_size: tuple[int, int]
    crop_pct: float
    store_size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    eval_image_size: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    default_augment: str = "rrc-flip"
    notes: list[str] = field(default_factory=list)
    is_store = True  # what the classification task tests to use StoreLoader instead of BatchLoader

    def __post_init__(self) -> None:
        channels = {s.channels for s in (self.train, self.val, self.test) if s is not None}
        if len(channels) > 1:
            raise DataError(f"{self.spec}: the splits' image stores differ in channels ({sorted(channels)}): "
                            "convert the grayscale or colour images so that every split has the same kind")
        self._pair_sizes()
        if not self.mean:  # measured on views at the training size, whatever the evaluation size
            self.mean, self.std = store_stats(self.first_split, self.image_size, self.crop_pct)
            if self.train is None:
                self.notes.append("no train split: normalisation statistics were measured on the evaluation split")

    @property
    def channels(self) -> int:
        return self.first_split.channels


def store_stats(store: ImageStore, image_size: tuple[int, int], crop_pct: float,
                max_images: int = STATS_IMAGES) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a seeded random sample of ``store``'s centre views at ``image_size`` (the
    training crop size: the statistics do not move with the evaluation size)."""
    indices = epoch_permutation(len(store), 0, -1)[:max_images]
    views = [resize_center_crop_batch([store.image(int(i)) for i in indices[s:s + 256]], image_size, crop_pct)
             for s in range(0, len(indices), 256)]
    return channel_stats(torch.cat(views))


def load_photo_folder(root: Path, spec: str, *, image_size: tuple[int, int] | None, store_size: int,
                      crop_pct: float = 0.875, skip_bad_images: bool = False, cache_dir: Path | None = None,
                      log: Callable[[str], None] = print, eval_image_size: tuple[int, int] | None = None,
                      interpolation: str = "bilinear") -> PhotoDataset:
    """The stores of ``root``'s train/val/test splits (built on first use, then reused); ``image_size`` is the
    training crop, ``eval_image_size`` the evaluation crop (default: ``image_size``), resized by
    ``interpolation``."""
    listing = list_image_folder(root)
    notes = list(listing.notes)
    if listing.ignored:
        notes.append(f"ignored {listing.ignored} entries in {printable(root)} that are not image files")
    if image_size is None:
        image_size = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        notes.append(f"store data: training and evaluating on {DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE} crops; "
                     "set --image-size to choose")
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    base = (Path(cache_dir) if cache_dir else default_cache_dir()) / "store" / f"{root.name}-{digest}-s{store_size}"
    stores = {split: build_store(files, listing.classes, base / split, store_size=store_size,
                                 skip_bad_images=skip_bad_images, log=log)
              for split, files in listing.files.items()}
    for split, store in stores.items():
        if store.skipped:
            notes.append(f"skipped {len(store.skipped)} unreadable image(s) in {split}")
    test = stores.get("test") or stores.get("val")
    val = stores.get("val") if "test" in stores else None
    return PhotoDataset(spec=spec, classes=[printable(c) for c in listing.classes], train=stores.get("train"),
                        test=test, val=val, image_size=tuple(image_size), crop_pct=crop_pct,  # type: ignore[arg-type]
                        store_size=store_size, notes=notes, interpolation=interpolation,
                        eval_image_size=tuple(eval_image_size) if eval_image_size else None)  # type: ignore[arg-type]


def decode_photo(path: str | Path, channels: int, store_size: int | None = None) -> torch.Tensor:
    """One image file as the store keeps it: uint8 (C, H, W), upright (EXIF orientation), alpha on white,
    shorter side shrunk to ``store_size`` (None: full size)."""
    try:
        with image_warnings(), Image.open(path) as img:
            size = stored_size(img, store_size)
        array = decode_upright(str(path), size, channels, store_size)
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one clear message
        raise DataError(f"cannot read image {printable(str(path))}: {decode_problem(str(path), exc)}") from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def photo_view(path: str | Path, preprocess: dict[str, Any], channels: int) -> torch.Tensor:
    """The evaluation view of one image file by a checkpoint's recorded ``preprocess``: uint8 (C, h, w)."""
    image = decode_photo(path, channels, preprocess.get("store_size"))
    return resize_center_crop(image, preprocess["crop"], float(preprocess["crop_pct"]),
                              recorded_interpolation(preprocess))
