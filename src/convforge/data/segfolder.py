"""Segmentation folders (``segfolder:DIR``): images with class-index masks, decoded once into a cache.

Layout::

    DIR/classes.txt
    DIR/train/images/<stem>.png   DIR/train/masks/<stem>.png
    DIR/val/images/<stem>.png     DIR/val/masks/<stem>.png      (val/ and test/: at least one)
    DIR/test/images/<stem>.png    DIR/test/masks/<stem>.png

An image and its mask share a file stem (``0001TP_006690.png`` in both folders). Images may be any
format convforge decodes (PNG, JPEG, BMP, WebP; grayscale or RGB); masks must be PNG files holding
one class index per pixel: single-channel 8-bit (mode ``L``) or 16-bit, or palette PNGs (mode ``P``),
whose palette *indices* are the classes (the colours are ignored). An RGB mask is accepted only when
its three channels are equal; colour-coded masks must be converted to indices first.

``classes.txt`` names the classes, one ``INDEX NAME`` line each (the name may contain spaces)::

    # comment lines start with '#'; blank lines are skipped
    0 Sky
    1 Building
    ...
    10 Bicyclist
    11 Unlabelled (ignore)

The class indices must be exactly 0..K-1. The *ignore index* (mask value that no loss or metric
counts) is the index of a line whose name contains "ignore" (any case), as ``11`` above, or is
given by a line ``ignore: 255``; the two must agree when both are present. Without either it is
255. The ignore class is not one of the K classes (``SegDataset.classes`` leaves it out). A mask
value that is neither a class index nor the ignore index is an error naming the file and value.

All images must have the same size, unless ``image_size`` is given: then each image is resized
(bilinear) and each mask (nearest neighbour, so labels stay exact) with the same geometry, scaling
to cover the target size and cropping the centre, as ``imagefolder`` resizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from convforge.data.cache import (
    default_cache_dir,
    map_in_processes,
    open_split,
    read_meta,
    write_entry,
)
from convforge.data.dataset import Dataset, channel_stats
from convforge.data.imagefolder import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    _BadImage,
    _decode,
    image_problem,
)
from convforge.data.paths import printable
from convforge.errors import DataError

SPLITS = ("train", "val", "test")
MASK_EXTENSIONS = (".png",)
DEFAULT_IGNORE_INDEX = 255
CACHE_FORMAT = 1
_CHUNK = 64  # image/mask pairs per decoding job


@dataclass
class SegDataset(Dataset):
    """A segmentation dataset: like :class:`~convforge.data.dataset.Dataset`, with (N, H, W) masks as
    the splits' ``labels``, ``classes`` without the ignore class, and the ``ignore_index``."""

    ignore_index: int = DEFAULT_IGNORE_INDEX
    task: ClassVar[str] = "segment"

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({"task": self.task, "ignore_index": self.ignore_index})
        return info


def parse_classes_file(path: Path) -> tuple[list[str], int]:
    """Read ``classes.txt`` (see the module docstring): returns the class names (indices 0..K-1) and
    the ignore index."""
    shown = printable(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(
            f"{shown} not found: a segmentation folder needs a classes.txt with one 'INDEX NAME' line per "
            f"class (e.g. '0 background'), and optionally 'ignore: 255'"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {shown}: {exc.strerror or exc}") from None
    names: dict[int, str] = {}
    ignore_named: list[tuple[int, int]] = []  # (index, line number) of classes named "...ignore..."
    ignore_line: tuple[int, int] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == "ignore":
            try:
                ignore_line = (int(value.strip()), number)
            except ValueError:
                raise DataError(f"{shown}, line {number}: 'ignore:' needs an integer, got {value.strip()!r}") from None
            if ignore_line[0] < 0:
                raise DataError(f"{shown}, line {number}: the ignore index must be >= 0, got {ignore_line[0]}")
            continue
        first, _, name = line.partition(" ")
        name = name.strip()
        try:
            index = int(first)
        except ValueError:
            index = -1
        if index < 0 or not name:
            raise DataError(
                f"{shown}, line {number}: expected 'INDEX NAME' (e.g. '3 road') or 'ignore: INDEX', got {printable(line)!r}"
            )
        if index in names or any(index == i for i, _ in ignore_named):
            raise DataError(f"{shown}, line {number}: index {index} is named twice")
        if "ignore" in name.lower():
            ignore_named.append((index, number))
        else:
            names[index] = name
    ignores = {i for i, _ in ignore_named} | ({ignore_line[0]} if ignore_line else set())
    if len(ignores) > 1:
        raise DataError(f"{shown} names more than one ignore index ({', '.join(map(str, sorted(ignores)))}): keep one")
    ignore_index = ignores.pop() if ignores else DEFAULT_IGNORE_INDEX
    if not names:
        raise DataError(f"{shown} names no classes: add one 'INDEX NAME' line per class, from 0")
    expected = list(range(len(names)))
    if sorted(names) != expected:
        missing = sorted(set(expected) - set(names))
        raise DataError(
            f"{shown}: class indices must be 0..{len(names) - 1} without gaps, got {', '.join(map(str, sorted(names)))}"
            + (f" (missing {', '.join(map(str, missing))})" if missing else "")
            + "; the ignore value is named separately ('ignore: N' or a class named '... (ignore)')"
        )
    if ignore_index in names:
        raise DataError(f"{shown}: the ignore index {ignore_index} is also the class {names[ignore_index]!r}")
    return [names[i] for i in expected], ignore_index


@dataclass
class _Listing:
    pairs: dict[str, list[tuple[str, str]]]  # split -> [(image path, mask path)], sorted by stem
    ignored: int


def _files(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:
        raise DataError(f"cannot list {printable(folder)}: {exc.strerror or exc}") from None


def _by_stem(folder: Path, extensions: tuple[str, ...]) -> tuple[dict[str, str], int]:
    found: dict[str, str] = {}
    ignored = 0
    for entry in _files(folder):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in extensions or entry.is_dir():
            ignored += 1
            continue
        if stem in found:
            raise DataError(
                f"{printable(found[stem])} and {printable(entry.path)} have the same stem: keep one image per name"
            )
        found[stem] = entry.path
    return found, ignored


def list_segfolder(root: Path) -> _Listing:
    """Pair ``<split>/images/<stem>.*`` with ``<split>/masks/<stem>.png``; unmatched files are errors."""
    shown = printable(root)
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        raise DataError(
            f"{shown} has no train/, val/ or test/ folder: expected {shown}/train/images/*.png, "
            f"{shown}/train/masks/*.png (and the same under test/ or val/) and {shown}/classes.txt"
        )
    if present == ["train"]:
        raise DataError(f"{shown} has a 'train' folder but neither 'test' nor 'val': add one to evaluate on")
    pairs: dict[str, list[tuple[str, str]]] = {}
    ignored = 0
    for split in present:
        for sub in ("images", "masks"):
            if not (root / split / sub).is_dir():
                raise DataError(f"{printable(root / split / sub)} not found: each split needs images/ and masks/ folders")
        images, skipped_images = _by_stem(root / split / "images", IMAGE_EXTENSIONS)
        masks, skipped_masks = _by_stem(root / split / "masks", MASK_EXTENSIONS)
        ignored += skipped_images + skipped_masks
        lonely = [images[s] for s in images if s not in masks]
        if lonely:
            more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
            stem = Path(lonely[0]).stem
            raise DataError(
                f"image {printable(lonely[0])}{more} has no mask: expected {printable(root / split / 'masks' / stem)}.png"
            )
        orphans = [masks[s] for s in masks if s not in images]
        if orphans:
            more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
            raise DataError(
                f"mask {printable(orphans[0])}{more} has no image in {printable(root / split / 'images')}: "
                f"remove it or add the image"
            )
        if not images:
            raise DataError(f"{printable(root / split / 'images')} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        pairs[split] = [(images[s], masks[s]) for s in sorted(images)]
    return _Listing(pairs=pairs, ignored=ignored)


def decode_mask(path: str) -> np.ndarray:
    """A mask PNG as (H, W) class indices: uint8, or int32 for 16-bit masks; palette PNGs give indices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if not 0 < img.width * img.height <= MAX_IMAGE_PIXELS:
                raise _BadImage(f"its header claims {img.width}x{img.height} pixels")
            img.load()
            mode = img.mode
            if mode in ("L", "P", "1"):
                return np.array(img.convert("L") if mode == "1" else img, dtype=np.uint8) // (255 if mode == "1" else 1)
            if mode.startswith("I;16") or mode == "I":
                return np.array(img, dtype=np.int32)
            if mode == "RGB":
                rgb = np.asarray(img, dtype=np.uint8)
                if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
                    return rgb[..., 0].copy()
            raise _BadImage(
                f"a mask must be a single-channel class-index PNG (mode L, P or 16-bit), this one is {mode}"
                + (" with different colours per channel: convert colour-coded masks to class indices" if mode == "RGB" else "")
            )


def _fit(img: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """Scale to cover ``size`` (H, W) and crop the centre: the same geometry for an image and its mask."""
    height, width = size
    scale = max(height / img.height, width / img.width)
    resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), resample)
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _decode_pair(image_path: str, mask_path: str, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = _decode(image_path, None)
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a message naming the file
        raise _BadImage(f"cannot read image {printable(image_path)}: {image_problem(image_path, exc)}") from None
    try:
        mask = decode_mask(mask_path)
    except Exception as exc:  # noqa: BLE001
        raise _BadImage(f"cannot read mask {printable(mask_path)}: {image_problem(mask_path, exc)}") from None
    if image.shape[:2] != mask.shape:
        raise _BadImage(
            f"image {printable(image_path)} is {image.shape[1]}x{image.shape[0]} (WxH) but its mask "
            f"{printable(mask_path)} is {mask.shape[1]}x{mask.shape[0]}: they must match"
        )
    if size is not None and image.shape[:2] != size:
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        image = np.array(_fit(pil, size, Image.BILINEAR), dtype=np.uint8)
        image = image[:, :, None] if image.ndim == 2 else image
        mode = "I" if mask.dtype == np.int32 else "L"
        mask = np.array(_fit(Image.fromarray(mask, mode), size, Image.NEAREST), dtype=mask.dtype)
    return image, mask


def _decode_chunk(args: tuple[list[tuple[str, str]], tuple[int, int] | None]) -> list[tuple[np.ndarray, np.ndarray] | str]:
    pairs, size = args
    out: list[tuple[np.ndarray, np.ndarray] | str] = []
    for image_path, mask_path in pairs:
        try:
            out.append(_decode_pair(image_path, mask_path, size))
        except _BadImage as exc:
            out.append(str(exc))
    return out


def _decode_all(
    pairs: list[tuple[str, str]], size: tuple[int, int] | None, workers: int, label: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    jobs = [(pairs[i:i + _CHUNK], size) for i in range(0, len(pairs), _CHUNK)]
    decoded: list[tuple[np.ndarray, np.ndarray]] = []
    failures: list[str] = []
    for items in map_in_processes(_decode_chunk, jobs, workers, label):
        for item in items:
            if isinstance(item, str):
                failures.append(item)
            else:
                decoded.append(item)
    return decoded, failures


def _fingerprint(root: Path, listing: _Listing, classes_text: bytes, size: tuple[int, int] | None) -> str:
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT, "root": str(root.resolve()), "size": list(size) if size else None}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(classes_text)
    for split in sorted(listing.pairs):
        for pair in listing.pairs[split]:
            for path in pair:
                try:
                    st = os.stat(path)
                    stamp = f"{st.st_size}\0{st.st_mtime_ns}"
                except OSError:
                    stamp = "missing"
                digest.update(f"{split}\0{path}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


def _check_mask_values(
    split_pairs: list[tuple[str, str]], masks: np.ndarray, num_classes: int, ignore_index: int, classes_file: Path
) -> None:
    bad = (masks >= num_classes) & (masks != ignore_index)
    if not bad.any():
        return
    rows = np.flatnonzero(bad.reshape(len(masks), -1).any(axis=1))
    shown = []
    for row in rows[:5]:
        values = np.unique(masks[row][bad[row]])
        listed = ", ".join(map(str, values[:8].tolist())) + (", ..." if len(values) > 8 else "")
        shown.append(f"{printable(split_pairs[row][1])} (value {listed})")
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise DataError(
        f"mask values outside the classes in {len(rows)} file(s): {'; '.join(shown)}{more}. "
        f"{printable(classes_file)} names {num_classes} classes (0..{num_classes - 1}) and the ignore index "
        f"{ignore_index}: fix the masks, add the classes to classes.txt, or name the ignore value ('ignore: N')"
    )


def _size_pair(value: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise DataError(f"image size must be a positive integer or a (height, width) pair, got {value!r}")
    return pair  # type: ignore[return-value]


def load_segfolder(
    root: Path,
    *,
    image_size: int | tuple[int, int] | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
    spec: str | None = None,
    workers: int | None = None,
) -> SegDataset:
    """Load a segmentation folder (see the module docstring), from the decoding cache when it is current.

    The cache entry (``<cache>/segfolder/<name>-<key>``, ``$CONVFORGE_CACHE`` by default) is keyed by
    the folder, ``classes.txt``, the file list with sizes and modification times, and ``image_size``.
    """
    root = Path(root)
    shown = printable(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {shown}")
    size = _size_pair(image_size)
    classes_file = root / "classes.txt"
    classes, ignore_index = parse_classes_file(classes_file)
    listing = list_segfolder(root)
    notes: list[str] = []
    if listing.ignored:
        notes.append(f"ignored {listing.ignored} entries in {shown} that are not image or mask files")
    key = _fingerprint(root, listing, classes_file.read_bytes(), size)
    entry = Path(cache_dir or default_cache_dir()) / "segfolder" / f"{root.name}-{key}"
    meta = read_meta(entry)
    if meta is None:
        _decode_into_cache(root, listing, size, classes, ignore_index, classes_file, entry, workers, log)
        meta = read_meta(entry)
    splits = {name: open_split(entry, name) for name in meta["splits"]}
    notes += [printable(n) for n in meta.get("notes", [])]
    if "train" not in splits:
        notes.append("no train split: normalisation statistics were measured on the evaluation split")
    test = splits.get("test") or splits.get("val")
    val = splits.get("val") if "test" in splits else None
    return SegDataset(spec=spec or f"segfolder:{root}", classes=classes, train=splits.get("train"), test=test,
                      val=val, mean=tuple(meta["mean"]), std=tuple(meta["std"]), default_augment="scale-crop-flip",
                      notes=notes, ignore_index=ignore_index)


def _decode_into_cache(
    root: Path, listing: _Listing, size: tuple[int, int] | None, classes: list[str], ignore_index: int,
    classes_file: Path, entry: Path, workers: int | None, log: Callable[[str], None],
) -> None:
    total = sum(len(p) for p in listing.pairs.values())
    log(f"decoding {total} image/mask pairs from {printable(root)} into the cache at {printable(entry)}")
    workers = workers or min(8, os.cpu_count() or 1)
    decoded: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    failures: list[str] = []
    for split, pairs in listing.pairs.items():
        decoded[split], failed = _decode_all(pairs, size, workers, f"decode {split}")
        failures += failed
    if failures:
        raise DataError(f"{len(failures)} image/mask pair(s) could not be used: " + "; ".join(failures[:5])
                        + ("; ..." if len(failures) > 5 else ""))
    shapes = Counter(image.shape[:2] for items in decoded.values() for image, _ in items)
    if len(shapes) > 1:
        common = ", ".join(f"{h}x{w} (HxW) in {n} file(s)" for (h, w), n in shapes.most_common(4))
        odd = next(listing.pairs[s][i][0] for s, items in decoded.items() for i, (image, _) in enumerate(items)
                   if image.shape[:2] != shapes.most_common(1)[0][0])
        raise DataError(
            f"images in {printable(root)} differ in size: {common}{', ...' if len(shapes) > 4 else ''} "
            f"(e.g. {printable(odd)}): pass --image-size (image_size=...) to resize them all "
            f"(images bilinearly, masks by nearest neighbour)"
        )
    channels = max(image.shape[2] for items in decoded.values() for image, _ in items)
    converted = sum(image.shape[2] != channels for items in decoded.values() for image, _ in items)
    notes = [f"converted {converted} grayscale image(s) to RGB (the dataset has RGB images)"] if converted else []
    mask_dtype = np.uint8 if max(len(classes) - 1, ignore_index) <= 255 else np.int64
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, items in decoded.items():
        height, width = items[0][0].shape[:2]
        images = np.empty((len(items), channels, height, width), dtype=np.uint8)
        wide = any(mask.dtype != np.uint8 for _, mask in items)  # 16-bit masks: check before narrowing
        masks = np.empty((len(items), height, width), dtype=np.int64 if wide else np.uint8)
        for i, (image, mask) in enumerate(items):
            images[i] = (image if image.shape[2] == channels else np.repeat(image, channels, 2)).transpose(2, 0, 1)
            masks[i] = mask
        _check_mask_values(listing.pairs[split], masks, len(classes), ignore_index, classes_file)
        arrays[split] = (images, masks.astype(mask_dtype, copy=False))
    # Normalisation statistics, measured once here (on train, else on the first split) rather than at every load.
    first = next(arrays[s][0] for s in SPLITS if s in arrays)
    mean, std = channel_stats(torch.from_numpy(first))
    meta = {"format": CACHE_FORMAT, "classes": classes, "ignore_index": ignore_index,
            "splits": sorted(arrays), "notes": notes, "mean": list(mean), "std": list(std)}
    write_entry(entry, arrays, meta)

