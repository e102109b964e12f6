"""Image folders (DIR/{train,val,test}/<class>/*.png|jpg|...), decoded once into a uint8 cache on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convforge.data.dataset import Split
from convforge.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_FORMAT = 1
# Decompression-bomb guard: refuse images above this many pixels (PIL's own default is ~89 M).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
MMAP_THRESHOLD_BYTES = int(os.environ.get("CONVFORGE_MMAP_THRESHOLD", 4 * 1024**3))


@dataclass
class FolderListing:
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> [(path, class index)]
    ignored: int


def default_cache_dir() -> Path:
    """``$CONVFORGE_CACHE`` or ``~/.cache/convforge``."""
    root = os.environ.get("CONVFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "convforge")
    return Path(root)


def list_image_folder(root: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> FolderListing:
    """Find ``root/<split>/<class>/<image>`` files; classes are the sorted union of class folders."""
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise DataError(
            f"{root} has no train/, val/ or test/ folder: expected {root}/train/<class>/*.png and {root}/test/<class>/*.png"
        )
    if present == ["train"]:
        raise DataError(f"{root} has a 'train' folder but neither 'test' nor 'val': add one to evaluate on")
    classes = sorted({entry.name for s in present for entry in os.scandir(root / s) if entry.is_dir()})
    if not classes:
        raise DataError(f"{root / present[0]} has no class folders: expected {root}/{present[0]}/<class>/*.png")
    files: dict[str, list[tuple[str, int]]] = {}
    ignored = 0
    for split in present:
        items: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            folder = root / split / name
            if not folder.is_dir():
                continue
            found = []
            for entry in os.scandir(folder):
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(entry.path)
                else:
                    ignored += 1
            if not found and split == present[0]:
                raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            items.extend((path, label) for path in sorted(found))
        if not items:
            raise DataError(f"{root / split} holds no images")
        files[split] = items
    return FolderListing(classes=classes, files=files, ignored=ignored)


def _fingerprint(listing: FolderListing, root: Path, options: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "root": str(root.resolve()), **options}, sort_keys=True).encode())
    for split in sorted(listing.files):
        for path, label in listing.files[split]:
            st = os.stat(path)
            digest.update(f"{split}\0{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


def decode_image(path: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one file to uint8 (H, W, C) with C = 1 (grayscale modes) or 3 (everything else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit")
            img.load()
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                high = np.asarray(img, dtype=np.float64)
                scale = 256.0 if img.mode != "F" else 1.0
                img = Image.fromarray(np.clip(high / scale, 0, 255).astype(np.uint8), "L")
            img = img.convert("L" if img.mode in ("1", "L", "LA") else "RGB")
            if size is not None and (img.height, img.width) != size:
                img = _resize_center_crop(img, size)
            array = np.array(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _resize_center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    scale = max(height / img.height, width / img.width)
    resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.BILINEAR)
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _decode_chunk(args: tuple[list[str], tuple[int, int] | None]) -> list[np.ndarray | str]:
    paths, size = args
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(decode_image(path, size))
        except Exception as exc:  # any decoder failure becomes a per-file message
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _probe_size(path: str) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except Exception:
        return None


def decode_files(
    paths: list[str], size: tuple[int, int] | None, workers: int, progress_label: str
) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """Decode ``paths`` in ``workers`` processes; returns arrays (None for failures) and (path, error) pairs."""
    from convforge.progress import progress_iter

    chunk = 512
    jobs = [(paths[i:i + chunk], size) for i in range(0, len(paths), chunk)]
    results: list[np.ndarray | None] = []
    failures: list[tuple[str, str]] = []
    if workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        mapped = pool.map(_decode_chunk, jobs)
    else:
        pool = None
        mapped = map(_decode_chunk, jobs)
    try:
        for (job_paths, _), decoded in progress_iter(zip(jobs, mapped), total=len(jobs), label=progress_label):
            for path, item in zip(job_paths, decoded):
                if isinstance(item, str):
                    failures.append((path, item))
                    results.append(None)
                else:
                    results.append(item)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results, failures


def load_image_folder(
    root: Path,
    image_size: tuple[int, int] | None = None,
    skip_bad_images: bool = False,
    cache_dir: Path | None = None,
    workers: int | None = None,
    log=print,
) -> tuple[list[str], dict[str, Split], list[str]]:
    """Load (from the cache when possible) every split of an image folder; returns classes, splits, notes."""
    root = Path(root)
    listing = list_image_folder(root)
    notes: list[str] = []
    if listing.ignored:
        notes.append(f"ignored {listing.ignored} entries in {root} that are not {'/'.join(IMAGE_EXTENSIONS)} files")
    size = image_size
    if size is None:
        sample = [p for split in listing.files.values() for p, _ in split[:: max(1, len(split) // 200)]]
        sizes = Counter(s for s in map(_probe_size, sample) if s is not None)
        if len(sizes) > 1:
            size = sizes.most_common(1)[0][0]
            notes.append(f"images differ in size; resizing all to {size[0]}x{size[1]} (the most common); set --image-size to choose")
    options = {"size": list(size) if size else None, "skip_bad": skip_bad_images}
    key = _fingerprint(listing, root, options)
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache_root / "imagefolder" / f"{root.name}-{key}"
    if (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        splits = {name: _open_cached(entry, name) for name in meta["splits"]}
        return meta["classes"], splits, notes + meta.get("notes", [])

    log(f"decoding {sum(len(v) for v in listing.files.values())} images from {root} into the cache at {entry}")
    workers = workers or min(8, os.cpu_count() or 1)
    decoded: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    bad: list[tuple[str, str]] = []
    for split, items in listing.files.items():
        arrays, failures = decode_files([p for p, _ in items], size, workers, f"decode {split}")
        bad.extend(failures)
        kept = [(a, label) for a, (_, label) in zip(arrays, items) if a is not None]
        decoded[split] = ([a for a, _ in kept], [label for _, label in kept])
    if bad:
        shown = "; ".join(f"{_display(p)} ({err})" for p, err in bad[:5])
        if not skip_bad_images:
            raise DataError(
                f"{len(bad)} image file(s) could not be decoded: {shown}. "
                f"Remove or fix them, or pass --skip-bad-images to skip them."
            )
        notes.append(f"skipped {len(bad)} unreadable image(s): {shown}")
    shapes = Counter(a.shape[:2] for arrays, _ in decoded.values() for a in arrays)
    if len(shapes) > 1:
        raise DataError(f"images in {root} differ in size ({', '.join(f'{h}x{w}' for h, w in shapes)}); pass --image-size")
    if not shapes:
        raise DataError(f"no image in {root} could be decoded")
    channels = max(a.shape[2] for arrays, _ in decoded.values() for a in arrays)
    converted = sum(a.shape[2] != channels for arrays, _ in decoded.values() for a in arrays)
    if converted:
        notes.append(f"converted {converted} grayscale image(s) to RGB (the dataset has RGB images)")
    for split, (arrays, labels) in decoded.items():
        if not arrays:
            raise DataError(f"every image in {root / split} failed to decode")
        present = set(labels)
        missing = [listing.classes[i] for i in range(len(listing.classes)) if i not in present]
        if split == "train" and missing:
            raise DataError(f"class folder(s) with no usable image in {root / split}: {', '.join(missing)}")
    _write_cache(entry, listing.classes, decoded, channels, notes)
    meta = json.loads((entry / "meta.json").read_text())
    splits = {name: _open_cached(entry, name) for name in meta["splits"]}
    return listing.classes, splits, notes


def _display(path: str) -> str:
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _write_cache(entry: Path, classes: list[str], decoded: dict, channels: int, notes: list[str]) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for split, (arrays, labels) in decoded.items():
            images = np.empty((len(arrays), channels, *arrays[0].shape[:2]), dtype=np.uint8)
            for i, a in enumerate(arrays):
                images[i] = a.transpose(2, 0, 1) if a.shape[2] == channels else np.repeat(a, channels, 2).transpose(2, 0, 1)
            np.save(tmp / f"{split}_images.npy", images)
            np.save(tmp / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
        meta = {"format": CACHE_FORMAT, "classes": classes, "splits": sorted(decoded), "notes": notes}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same entry first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_cached(entry: Path, split: str) -> Split:
    path = entry / f"{split}_images.npy"
    # Small caches are read in one sequential pass: random-order batches from a cold memory map
    # would cost one disk seek per image. Larger ones are memory-mapped (copy-on-write, so writable).
    mmap = "c" if path.stat().st_size > MMAP_THRESHOLD_BYTES else None
    images = np.load(path, mmap_mode=mmap, allow_pickle=False)
    labels = np.load(entry / f"{split}_labels.npy", allow_pickle=False)
    return Split(torch.from_numpy(images), torch.from_numpy(labels))

