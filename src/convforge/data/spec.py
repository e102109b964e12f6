"""``--data`` specs: ``digits``, ``synthetic[:k=v,...]``, ``mnist:DIR``, ``cifar10:DIR``, ``imagefolder:DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from convforge.data import sources
from convforge.data.dataset import Dataset
from convforge.data.imagefolder import load_image_folder
from convforge.errors import DataError

KINDS = ("digits", "synthetic", "mnist", "cifar10", "imagefolder")
SYNTHETIC_OPTIONS = {"classes": int, "size": int, "channels": int, "train": int, "test": int, "seed": int}


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``KIND:ARG`` into its parts, with an error that lists the kinds for anything else."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        hint = f" For a folder of images use imagefolder:{spec}." if Path(spec).exists() else ""
        raise DataError(f"unknown data spec {spec!r}: use one of digits, synthetic, mnist:DIR, cifar10:DIR, imagefolder:DIR.{hint}")
    if kind in ("mnist", "cifar10", "imagefolder") and not arg:
        raise DataError(f"data spec {spec!r} needs a directory: {kind}:DIR")
    return kind, arg


def load(
    spec: str,
    *,
    image_size: int | tuple[int, int] | None = None,
    skip_bad_images: bool = False,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Dataset:
    """Load a dataset from its spec, e.g. ``load("digits")`` or ``load("imagefolder:data/cifar10-jpeg")``.

    Image folders are decoded once into a memory-mapped uint8 cache (``$CONVFORGE_CACHE``, by
    default ``~/.cache/convforge``) keyed by the file list, sizes and modification times.
    """
    kind, arg = parse_spec(spec)
    size = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    notes: list[str] = []
    augment = "crop-flip"
    if kind == "digits":
        classes, splits = sources.load_digits_splits()
        augment = "none"
    elif kind == "synthetic":
        classes, splits = sources.load_synthetic(**_synthetic_options(arg))
        augment = "none"
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


def _existing_dir(arg: str) -> Path:
    path = Path(arg).expanduser()
    if not path.exists():
        raise DataError(f"data directory not found: {path}")
    if not path.is_dir():
        raise DataError(f"{path} is not a directory")
    return path


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value else None


def _synthetic_options(arg: str) -> dict:
    options: dict = {}
    for item in filter(None, (part.strip() for part in arg.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in SYNTHETIC_OPTIONS:
            raise DataError(f"bad synthetic option {item!r}: use {', '.join(f'{k}=N' for k in SYNTHETIC_OPTIONS)}")
        try:
            options["num_classes" if key == "classes" else key] = SYNTHETIC_OPTIONS[key](value)
        except ValueError:
            raise DataError(f"synthetic option {key} must be an integer, got {value!r}") from None
    return options
