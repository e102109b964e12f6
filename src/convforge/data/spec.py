"""``--data`` specs: ``digits``, ``synthetic[:k=v,...]``, ``mnist:DIR``, ``cifar10:DIR``, ``imagefolder:DIR``,
``segfolder:DIR`` (segmentation: images with class-index masks, see ``convforge.data.segfolder``), ``wds:DIR``
(WebDataset tar shards, with ``store_size``: see ``convforge.data.shard_dataset``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from convforge.data import sources
from convforge.data.dataset import Dataset
from convforge.data.imagefolder import load_image_folder
from convforge.data.paths import printable
from convforge.data.segfolder import load_segfolder
from convforge.errors import DataError

KINDS = ("digits", "synthetic", "mnist", "cifar10", "imagefolder", "segfolder", "wds")
STORE_KINDS = ("imagefolder", "wds")  # the kinds --store-size reads (image stores, WebDataset shards)
SYNTHETIC_OPTIONS = {"classes": int, "size": int, "channels": int, "train": int, "test": int, "seed": int}
# Smallest and largest value of each synthetic option, and the most pixel values it may generate
# (as float32 before quantisation, so about 1 GiB at the limit).
SYNTHETIC_RANGES = {"classes": (1, 10_000), "size": (1, 4096), "channels": (1, 64), "train": (1, 10_000_000),
                    "test": (1, 10_000_000), "seed": (0, 2**63 - 1)}
SYNTHETIC_MAX_VALUES = 2**28
MAX_IMAGE_SIZE = 8192


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``KIND:ARG`` into its parts, with an error that lists the kinds for anything else."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        hint = ""
        if _exists(spec):
            seg = _exists(str(Path(spec) / "classes.txt"))
            hint = f" For a folder of {'images with masks' if seg else 'images'} use {'segfolder' if seg else 'imagefolder'}:{printable(spec)}."
        raise DataError(f"unknown data spec {spec!r}: use one of digits, synthetic, mnist:DIR, cifar10:DIR, imagefolder:DIR, segfolder:DIR, wds:DIR.{hint}")
    if kind in ("mnist", "cifar10", "imagefolder", "segfolder", "wds") and not arg:
        raise DataError(f"data spec {spec!r} needs a directory: {kind}:DIR")
    return kind, arg


def load(
    spec: str,
    *,
    image_size: int | tuple[int, int] | None = None,
    skip_bad_images: bool = False,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda message: None,
    store_size: int | None = None,
    crop_pct: float = 0.875,
    eval_image_size: int | tuple[int, int] | None = None,
    interpolation: str = "bilinear",
) -> Dataset:
    """Load a dataset from its spec, e.g. ``load("digits")`` or ``load("imagefolder:data/cifar10-jpeg")``.

    Image folders are decoded once into a memory-mapped uint8 cache (``$CONVFORGE_CACHE``, by
    default ``~/.cache/convforge``) keyed by the file list, sizes and modification times.
    ``segfolder:DIR`` returns a :class:`~convforge.data.segfolder.SegDataset` (masks as labels).
    ``imagefolder:DIR`` with ``store_size`` keeps images of any size in image stores and returns a
    :class:`~convforge.data.photos.PhotoDataset` (``image_size``: the training crop; ``crop_pct`` and
    ``eval_image_size``, default ``image_size``, and ``interpolation``: the evaluation view). ``wds:DIR``
    (WebDataset shards, see :mod:`convforge.data.shards`) needs ``store_size`` and returns a
    :class:`~convforge.data.shard_dataset.ShardDataset` decoded and viewed as image stores are.
    """
    if not isinstance(spec, str):
        raise DataError(f"a data spec must be a string such as 'digits' or 'imagefolder:DIR', got {spec!r}")
    kind, arg = parse_spec(spec)
    size = _image_size(image_size)
    if kind == "wds" and store_size is None:
        raise DataError(f"wds:DIR data (WebDataset shards) needs --store-size N (the shorter side images are "
                        f"decoded to, as for image stores), got {spec!r} without it")
    if store_size is not None:
        if kind not in STORE_KINDS:
            raise DataError(f"--store-size is for imagefolder:DIR or wds:DIR data, not {spec!r}")
        if kind == "wds":
            from convforge.data.shard_dataset import load_shard_folder

            return load_shard_folder(_existing_dir(arg), spec, image_size=size, store_size=store_size,  # type: ignore[return-value]
                                     crop_pct=crop_pct, skip_bad_images=skip_bad_images, log=log,
                                     eval_image_size=_image_size(eval_image_size), interpolation=interpolation)
        from convforge.data.photos import load_photo_folder

        return load_photo_folder(_existing_dir(arg), spec, image_size=size, store_size=store_size,  # type: ignore[return-value]
                                 crop_pct=crop_pct, skip_bad_images=skip_bad_images, cache_dir=_path(cache_dir), log=log,
                                 eval_image_size=_image_size(eval_image_size), interpolation=interpolation)
    if eval_image_size is not None:
        raise DataError("an evaluation image size of its own (eval_image_size) is for image-store data: "
                        "add --store-size N with imagefolder:DIR or wds:DIR")
    if interpolation != "bilinear":
        raise DataError(f"--interpolation {interpolation} (the evaluation resize filter) is for image-store data: "
                        "add --store-size N with imagefolder:DIR or wds:DIR")
    notes: list[str] = []
    augment = "crop-flip"
    if kind == "digits":
        classes, splits = sources.load_digits_splits()
        augment = "none"
    elif kind == "synthetic":
        classes, splits = sources.load_synthetic(**_synthetic_options(arg))
        augment = "none"
    elif kind == "segfolder":
        if skip_bad_images:
            raise DataError("--skip-bad-images is not supported for segfolder data: fix or remove the bad files")
        return load_segfolder(_existing_dir(arg), image_size=size, cache_dir=_path(cache_dir), log=log, spec=spec)
    elif kind == "cifar10":
        classes, splits = sources.load_cifar10_batches(_existing_dir(arg))
    else:
        root = _existing_dir(arg)
        if kind == "mnist":
            augment = "crop"
            idx = sources.find_idx_files(root)
            if idx is not None:
                classes, splits = sources.load_mnist_idx(idx)
            else:
                if not (root / "train").is_dir() and (root / "mnist" / "train").is_dir():
                    root = root / "mnist"
                if not (root / "train").is_dir():
                    raise DataError(
                        f"no MNIST data in {root}: expected the IDX files (train-images-idx3-ubyte[.gz], ...) "
                        f"or PNG folders {root}/train/<digit>/*.png and {root}/test/<digit>/*.png"
                    )
                classes, splits, notes = load_image_folder(root, size, skip_bad_images, _path(cache_dir), log=log)
        else:
            classes, splits, notes = load_image_folder(root, size, skip_bad_images, _path(cache_dir), log=log)
    test = splits.get("test") or splits.get("val")
    val = splits.get("val") if "test" in splits else None
    return Dataset(spec=spec, classes=classes, train=splits.get("train"), test=test, val=val,
                   default_augment=augment, notes=notes)


def _exists(text: str) -> bool:
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


def _existing_dir(arg: str) -> Path:
    if "\0" in arg:
        raise DataError(f"data directory {arg!r} contains a NUL character")
    try:
        path = Path(arg).expanduser()
    except RuntimeError:  # ~user for an unknown user
        raise DataError(f"data directory not found: {printable(arg)} (cannot expand '~')") from None
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # e.g. a name too long
        raise DataError(f"cannot use data directory {printable(path)}: {exc.strerror or exc}") from None
    if not exists:
        raise DataError(f"data directory not found: {printable(path)}")
    if not is_dir:
        raise DataError(f"{printable(path)} is not a directory")
    return path


def _image_size(value) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if (pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or not all(1 <= v <= MAX_IMAGE_SIZE for v in pair)):
        raise DataError(f"image size must be an integer in 1..{MAX_IMAGE_SIZE} (or a pair of them), got {value!r}")
    return pair  # type: ignore[return-value]


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value else None


def _synthetic_options(arg: str) -> dict:
    options: dict = {}
    for item in filter(None, (part.strip() for part in arg.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in SYNTHETIC_OPTIONS:
            raise DataError(f"bad synthetic option {item!r}: use {', '.join(f'{k}=N' for k in SYNTHETIC_OPTIONS)}")
        try:
            number = SYNTHETIC_OPTIONS[key](value)
        except ValueError:
            raise DataError(f"synthetic option {key} must be an integer, got {value!r}") from None
        low, high = SYNTHETIC_RANGES[key]
        if not low <= number <= high:
            raise DataError(f"synthetic option {key} must be in {low}..{high}, got {number}")
        options["num_classes" if key == "classes" else key] = number
    values = {name: p.default for name, p in inspect.signature(sources.load_synthetic).parameters.items()}
    values.update(options)
    total = (values["train"] + values["test"] + values["num_classes"]) * values["channels"] * values["size"] ** 2
    if total > SYNTHETIC_MAX_VALUES:
        raise DataError(
            f"synthetic data of {total:,} pixel values is over the limit of {SYNTHETIC_MAX_VALUES:,}: "
            f"use fewer or smaller images (train, test, size, channels)"
        )
    return options
