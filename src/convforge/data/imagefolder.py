"""Image folders (DIR/{train,val,test}/<class>/*.png|jpg|...), decoded once into a uint8 cache on disk."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from convforge.data.cache import (
    default_cache_dir,
    map_in_processes,
    open_split,
    read_meta,
    write_entry,
)
from convforge.data.dataset import Split
from convforge.data.paths import printable
from convforge.data.pixels import apply_orientation, flatten_alpha, to_8bit, upright_size
from convforge.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_FORMAT = 3  # 2: EXIF orientation applied (1 ignored it); 3: transparency composited on white (2 dropped it)
# Decompression-bomb guard: refuse images above this many pixels (PIL's own default is ~89 M).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@dataclass
class FolderListing:
    classes: list[str]  # class folder names as on disk (see ``printable`` for display)
    files: dict[str, list[tuple[str, int]]]  # split -> [(path, class index)]
    ignored: int
    notes: list[str] = field(default_factory=list)


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:
        raise DataError(f"cannot list {printable(folder)}: {exc.strerror or exc}") from None


def _kind(entry: os.DirEntry) -> str:
    """"dir", "file", "broken" (a dangling symlink), "loop" (a symlink cycle), "error" or "other"."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        return "broken" if entry.is_symlink() else "other"
    except OSError as exc:  # is_dir()/is_file() follow symlinks: ELOOP for a link to itself
        return "loop" if exc.errno == errno.ELOOP else "error"


def _link_target(path: str) -> str:
    try:
        return printable(os.readlink(path))
    except OSError:
        return "?"


def _check_class_entry(entry: os.DirEntry, kind: str, split_dir: Path) -> bool:
    """Whether ``entry`` (in a split folder) is a class folder; a broken or looping link is an error."""
    where = printable(entry.path)
    if kind in ("broken", "loop", "error"):
        what = {"broken": "a broken symbolic link", "loop": "a symbolic link loop"}.get(kind, "unreadable")
        link = f" (-> {_link_target(entry.path)})" if entry.is_symlink() else ""
        raise DataError(f"class folder {where} is {what}{link}: fix or remove it")
    if kind != "dir":
        return False
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        here = os.path.realpath(split_dir)
        if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
            raise DataError(
                f"class folder {where} is a symbolic link to {printable(target)}, which contains it "
                f"(a symlink loop): remove the link"
            )
    return True


def list_image_folder(root: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> FolderListing:
    """Find ``root/<split>/<class>/<image>`` files; classes are the sorted union of class folders.

    Folders are not searched recursively, so symlinked directories inside a class folder (loops
    included) are ignored and counted. An image-named entry that is a broken or looping symlink is
    listed, so that it fails to decode with a clear message (or is skipped with ``--skip-bad-images``).
    A class folder without images is an error, unless another split has images of that class
    (then it is a note).
    """
    shown = printable(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {shown}")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise DataError(
            f"{shown} has no train/, val/ or test/ folder: expected {shown}/train/<class>/*.png and {shown}/test/<class>/*.png"
        )
    if present == ["train"]:
        raise DataError(f"{shown} has a 'train' folder but neither 'test' nor 'val': add one to evaluate on")
    class_dirs: dict[str, set[str]] = {}
    for split in present:
        entries = _scandir(root / split)
        class_dirs[split] = {e.name for e in entries if _check_class_entry(e, _kind(e), root / split)}
    classes = sorted(set().union(*class_dirs.values()))
    if not classes:
        raise DataError(f"{printable(root / present[0])} has no class folders: expected {shown}/{present[0]}/<class>/*.png")
    found: dict[str, dict[str, list[str]]] = {split: {} for split in present}
    ignored = 0
    for split in present:
        for name in sorted(class_dirs[split]):
            images = []
            for entry in _scandir(root / split / name):
                kind = _kind(entry)
                if entry.name.lower().endswith(IMAGE_EXTENSIONS) and kind in ("file", "broken", "loop", "error"):
                    images.append(entry.path)
                else:
                    ignored += 1
            found[split][name] = images
    notes: list[str] = []
    files: dict[str, list[tuple[str, int]]] = {}
    for split in present:
        items: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            if name not in found[split]:
                continue
            images = found[split][name]
            if not images:
                folder = printable(root / split / name)
                elsewhere = [s for s in present if found[s].get(name)]
                if split == present[0] or not elsewhere:
                    raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
                notes.append(f"class folder {folder} holds no images (the class has images in {', '.join(elsewhere)})")
            items.extend((path, label) for path in images)
        if not items:
            raise DataError(f"{printable(root / split)} holds no images")
        files[split] = items
    return FolderListing(classes=classes, files=files, ignored=ignored, notes=notes)


def _fingerprint(listing: FolderListing, root: Path, options: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "root": str(root.resolve()), **options}, sort_keys=True).encode())
    for split in sorted(listing.files):
        for path, label in listing.files[split]:
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # a broken link: listed so that it is reported (or skipped) when decoding
                size, mtime = -1, -1
            digest.update(f"{split}\0{path}\0{label}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


class _BadImage(Exception):
    """An image refused by convforge's own checks; the message is the reason."""


def decode_image(path: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one file to uint8 (H, W, C) with C = 1 (grayscale modes) or 3 (everything else): upright by
    its EXIF orientation and 16-bit grayscale scaled to 8 bits, as image stores decode
    (``convforge.data.pixels``); an alpha channel is dropped (stores composite it on white).

    The format is found from the content, not the extension. Anything that cannot be decoded
    (truncated, corrupt, empty, not an image, a decompression bomb, a broken link) raises a
    DataError naming the file and the reason.
    """
    try:
        return _decode(path, size)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"cannot read image {printable(path)}: {image_problem(path, exc)}") from None


def image_problem(path: str, exc: BaseException) -> str:
    """Why decoding ``path`` failed with ``exc``, in words."""
    if isinstance(exc, _BadImage):
        return str(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused by the decompression-bomb guard ({exc})"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return f"a symbolic link loop (-> {_link_target(path)})"
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return f"a broken symbolic link (-> {_link_target(path)})"
        return "file not found"
    if isinstance(exc, OSError) and exc.errno is not None:
        return printable(exc.strerror or str(exc))
    if isinstance(exc, UnidentifiedImageError):
        try:
            if os.path.getsize(path) == 0:
                return "the file is empty (0 bytes)"
        except OSError:
            pass
        return "not an image in a known format (or its header is corrupt)"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode it"
    return printable(f"truncated or corrupt image data ({type(exc).__name__}: {exc})")


def _decode(path: str, size: tuple[int, int] | None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's "Corrupt EXIF data" etc.: a file either decodes or not
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise _BadImage(
                    f"its header claims {img.width}x{img.height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel "
                    f"decompression-bomb limit"
                )
            if img.width < 1 or img.height < 1:
                raise _BadImage(f"its header claims {img.width}x{img.height} pixels")
            img.load()
            # as image stores decode (convforge.data.pixels): upright, 16-bit scaled, transparency on white
            img = flatten_alpha(to_8bit(apply_orientation(img)))
            img = img.convert("L" if img.mode in ("1", "L", "LA", "La") else "RGB")
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
            out.append(_decode(path, size))
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a per-file message
            out.append(image_problem(path, exc))
    return out


def _probe_size(path: str) -> tuple[int, int] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if not 0 < img.width * img.height <= MAX_IMAGE_PIXELS:
                    return None  # refused when decoded; must not become the size everything is resized to
                width, height = upright_size(img)
                return height, width
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is decoded
        return None


def decode_files(
    paths: list[str], size: tuple[int, int] | None, workers: int, progress_label: str
) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """Decode ``paths`` in ``workers`` processes; returns arrays (None for failures) and (path, error) pairs."""
    chunk = 512
    jobs = [(paths[i:i + chunk], size) for i in range(0, len(paths), chunk)]
    results: list[np.ndarray | None] = []
    failures: list[tuple[str, str]] = []
    for (job_paths, _), decoded in zip(jobs, map_in_processes(_decode_chunk, jobs, workers, progress_label)):
        for path, item in zip(job_paths, decoded):
            if isinstance(item, str):
                failures.append((path, item))
                results.append(None)
            else:
                results.append(item)
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
    classes = [printable(name) for name in listing.classes]
    notes: list[str] = list(listing.notes)
    if listing.ignored:
        notes.append(f"ignored {listing.ignored} entries in {printable(root)} that are not {'/'.join(IMAGE_EXTENSIONS)} files")
    size = image_size
    sample = [p for split in listing.files.values() for p, _ in split[:: max(1, len(split) // 200)]]
    sizes = Counter(s for s in map(_probe_size, sample) if s is not None)
    if size is None and len(sizes) > 1:
        size = sizes.most_common(1)[0][0]
        notes.append(f"images differ in size; resizing all to {size[0]}x{size[1]} (the most common); set --image-size to choose")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()

    def cache_entry(target: tuple[int, int] | None) -> Path:
        options = {"size": list(target) if target else None, "skip_bad": skip_bad_images}
        return cache_root / "imagefolder" / f"{root.name}-{_fingerprint(listing, root, options)}"

    entry = cache_entry(size)
    meta = read_meta(entry)
    if meta is None and size is not None and list(sizes) == [tuple(size)] and read_meta(cache_entry(None)) is not None:
        entry = cache_entry(None)  # decoded at their own size already, which is the size asked for
        meta = read_meta(entry)
    if meta is not None:
        splits = {name: open_split(entry, name) for name in meta["splits"]}
        return [printable(c) for c in meta["classes"]], splits, notes + [printable(n) for n in meta.get("notes", [])]

    log(f"decoding {sum(len(v) for v in listing.files.values())} images from {printable(root)} "
        f"into the cache at {printable(entry)}")
    workers = workers or min(8, os.cpu_count() or 1)
    decoded: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    bad: list[tuple[str, str]] = []
    for split, items in listing.files.items():
        arrays, failures = decode_files([p for p, _ in items], size, workers, f"decode {split}")
        bad.extend(failures)
        kept = [(a, label) for a, (_, label) in zip(arrays, items) if a is not None]
        decoded[split] = ([a for a, _ in kept], [label for _, label in kept])
    if bad:
        shown = "; ".join(f"{printable(p)} ({err})" for p, err in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        if not skip_bad_images:
            raise DataError(
                f"{len(bad)} image file(s) could not be decoded: {shown}. "
                f"Remove or fix them, or pass --skip-bad-images to skip them."
            )
        notes.append(f"skipped {len(bad)} unreadable image(s): {shown}")
    shapes = Counter(a.shape[:2] for arrays, _ in decoded.values() for a in arrays)
    if len(shapes) > 1:
        raise DataError(f"images in {printable(root)} differ in size ({', '.join(f'{h}x{w}' for h, w in shapes)}); pass --image-size")
    if not shapes:
        raise DataError(f"no image in {printable(root)} could be decoded")
    channels = max(a.shape[2] for arrays, _ in decoded.values() for a in arrays)
    converted = sum(a.shape[2] != channels for arrays, _ in decoded.values() for a in arrays)
    if converted:
        notes.append(f"converted {converted} grayscale image(s) to RGB (the dataset has RGB images)")
    for split, (arrays, labels) in decoded.items():
        if not arrays:
            raise DataError(f"every image in {printable(root / split)} failed to decode")
        present = set(labels)
        missing = [classes[i] for i in range(len(classes)) if i not in present]
        if split == "train" and missing:
            raise DataError(
                f"class folder(s) with no usable image in {printable(root / split)}: {', '.join(missing)} "
                f"(images of them are only in other splits, or every one failed to decode): add training "
                f"images or remove the class from every split"
            )
    arrays = {}
    for split, (images, labels) in decoded.items():
        stacked = np.empty((len(images), channels, *images[0].shape[:2]), dtype=np.uint8)
        for i, image in enumerate(images):
            stacked[i] = (image if image.shape[2] == channels else np.repeat(image, channels, 2)).transpose(2, 0, 1)
        arrays[split] = (stacked, np.asarray(labels, dtype=np.int64))
    write_entry(entry, arrays, {"format": CACHE_FORMAT, "classes": classes, "splits": sorted(decoded), "notes": notes})
    splits = {name: open_split(entry, name) for name in decoded}
    return classes, splits, notes
