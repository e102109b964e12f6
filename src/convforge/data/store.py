"""The variable-size image store: every image decoded once, at its own aspect ratio, into one memory-mapped file.

A store is a directory holding ``images.u8`` (the pixels of every image, uint8 H x W x C each, one after
another: the interleaved layout PyTorch's uint8 resize kernel reads, so a crop is copied row by row instead
of transposed), ``index.npy`` (int64 N x 3: byte offset, height, width), ``labels.npy`` (int64 N) and
``meta.json`` (classes, channels, the build key; written last). Images are shrunk so that their shorter
side is at most ``store_size`` (never enlarged), upright (EXIF orientation applied), with transparency
composited on white.

A build works in ``.<name>.partial`` next to the store: the image sizes are read from the file headers
first, so ``images.u8`` is allocated in full before anything is decoded; worker processes then decode
chunks of images straight into it, and the parent records each finished chunk in ``progress.jsonl``.
A killed build resumes from that record when run again with the same files; the store appears only
by a rename once complete, so a reader never sees half of one. The fault point ``store:chunk`` (see
``convforge.faults``) is reached after each recorded chunk. A lock on ``.<name>.lock`` makes a second
build of the same store (another process) wait for the first and then reuse it; under torchrun only
local rank 0 builds and the other ranks wait for it without any collective (``store_build``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from convforge.data.cache import map_in_processes
from convforge.data.imagefolder import MAX_IMAGE_PIXELS, image_problem
from convforge.data.paths import printable
from convforge.data.pixels import SWAPPING_ORIENTATIONS, flatten_alpha, header_orientation, to_8bit
from convforge.data.store_build import build_lock, is_builder, wait_for_store
from convforge.errors import DataError, DiskFullError
from convforge.faults import fault_point
from convforge.fileio import atomic_write_json

STORE_FORMAT = 2  # 1: planar C x H x W pixels; 2: interleaved H x W x C
STORE_KIND = "convforge-image-store"
CHUNK_IMAGES = 256  # images per decoding job, and the unit a killed build resumes from
PROBE_CHUNK = 1024  # file headers read per job
GRAY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")


class ImageStore:
    """A built store, opened read-only (copy-on-write) as one memory map; ``image(i)`` is a zero-copy view."""

    def __init__(self, path: Path, meta: dict, index: np.ndarray, labels: np.ndarray, data: np.ndarray) -> None:
        self.path = path
        self.classes: list[str] = list(meta["classes"])
        self.channels: int = int(meta["channels"])
        self.store_size: int = int(meta["store_size"])
        self.skipped: list[list[str]] = list(meta.get("skipped", []))
        self._index = index
        self.labels = torch.from_numpy(labels)
        self.sizes = torch.from_numpy(np.ascontiguousarray(index[:, 1:3]))
        self._data = torch.from_numpy(data)

    def __len__(self) -> int:
        return len(self._index)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 (C, H, W), a view of the memory map (channels-last strides; copy it before writing
        to it)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} is out of range for the store {printable(self.path)} of {len(self)} images")
        offset, height, width = self._index[i].tolist()
        pixels = self._data[offset:offset + self.channels * height * width]
        return pixels.view(height, width, self.channels).permute(2, 0, 1)

    def __reduce__(self):  # pickled as its path: a worker process maps the file itself instead of copying it
        return open_store, (self.path,)

    def __repr__(self) -> str:
        return f"ImageStore({printable(self.path)!r}, {len(self)} images, {len(self.classes)} classes)"


def open_store(out: Path) -> ImageStore:
    """Open the store built at ``out``; a missing, partial or damaged one raises a DataError saying so."""
    out = Path(out)
    meta = _read_store_meta(out)
    if meta is None:
        raise DataError(f"{printable(out)} is not a built image store (no meta.json): build it with build_store")
    if meta.get("format") != STORE_FORMAT:
        raise DataError(
            f"the image store {printable(out)} has format {meta.get('format')}, this convforge reads format "
            f"{STORE_FORMAT}: build it again (build_store replaces it)"
        )
    damaged = f"the image store {printable(out)} is damaged"
    missing = [name for name in ("classes", "channels", "store_size", "count", "bytes") if name not in meta]
    if missing:
        raise DataError(f"{damaged}: meta.json lacks {', '.join(missing)}; delete it and build it again")
    try:
        index = np.load(out / "index.npy", allow_pickle=False)
        labels = np.load(out / "labels.npy", allow_pickle=False)
        size = (out / "images.u8").stat().st_size
    except (OSError, ValueError) as exc:
        raise DataError(f"{damaged} ({exc}): delete it and build it again") from None
    problem = _layout_problem(meta, index, labels, size)
    if problem:
        raise DataError(f"{damaged}: {problem}; delete it and build it again")
    nbytes = meta["bytes"]
    data = np.memmap(out / "images.u8", dtype=np.uint8, mode="c", shape=(nbytes,)) if nbytes else np.zeros(0, np.uint8)
    return ImageStore(out, meta, index, labels, data)


def _layout_problem(meta: dict, index: np.ndarray, labels: np.ndarray, size: int) -> str | None:
    """What does not fit together in a store's files, or None."""
    count, nbytes = meta["count"], meta["bytes"]
    if index.shape != (count, 3) or index.dtype != np.int64:
        return f"index.npy holds {index.dtype} {index.shape}, expected int64 ({count}, 3)"
    if labels.shape != (count,) or labels.dtype != np.int64:
        return f"labels.npy holds {labels.dtype} {labels.shape}, expected int64 ({count},)"
    if size != nbytes:
        return f"images.u8 holds {size} bytes, expected {nbytes}"
    ends = index[:, 0] + meta["channels"] * index[:, 1] * index[:, 2]
    if count and (index.min() < 0 or ends.max() > nbytes):
        return "index.npy points outside images.u8"
    return None


def _read_store_meta(out: Path) -> dict | None:
    path = out / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {printable(path)} ({exc}): delete {printable(out)} and build it again") from None
    if not isinstance(meta, dict) or meta.get("kind") != STORE_KIND:
        raise DataError(f"{printable(out)} is not a convforge image store: choose another path")
    return meta


# ----------------------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Plan:
    """Where every image goes: ``rows`` (N x 3 int64 offset, height, width; height 0 = unreadable header)."""

    rows: np.ndarray
    channels: int
    nbytes: int
    failures: dict[int, str]  # index -> why its header could not be used


def build_store(
    files: Sequence[tuple[str, int]],
    classes: Sequence[str],
    out: Path,
    *,
    store_size: int,
    workers: int | None = None,
    skip_bad_images: bool = False,
    log: Callable[[str], None] = print,
    local_rank: int | None = None,
) -> ImageStore:
    """Decode ``files`` ((path, class index) pairs) into a store at ``out``, or open it if already built.

    Each image is decoded once, in ``workers`` processes, with its shorter side shrunk to at most
    ``store_size``. A store built from the same files (paths, sizes, modification times), labels,
    classes and ``store_size`` is reused; otherwise it is rebuilt, resuming a killed build of the same
    inputs. Unreadable images raise a DataError naming them, or are skipped (and listed in
    ``ImageStore.skipped``) with ``skip_bad_images``. Under torchrun only local rank 0 builds; the
    other local ranks (``local_rank`` None: ``LOCAL_RANK``) wait for it (see ``convforge.data.store_build``).
    """
    out = Path(out)
    if isinstance(store_size, bool) or not isinstance(store_size, int) or store_size < 1:
        raise DataError(f"store_size must be a positive whole number of pixels, not {store_size!r}")
    files = [(os.fspath(path), int(label)) for path, label in files]
    classes = [str(name) for name in classes]
    if not files:
        raise DataError(f"no image files given for the image store {printable(out)}")
    wrong = [(path, label) for path, label in files if not 0 <= label < len(classes)]
    if wrong:
        raise DataError(
            f"{printable(wrong[0][0])} has class index {wrong[0][1]}, but there are {len(classes)} classes "
            f"(indices 0 to {len(classes) - 1}): fix the file list"
        )
    key = _build_key(files, classes, store_size)
    workers = max(1, workers or min(8, os.cpu_count() or 1))
    if is_builder(local_rank):
        with build_lock(out, log):
            meta = _read_store_meta(out)
            if meta is None or meta.get("key") != key:
                _check_replaceable(out)
                _build(files, classes, out, key, store_size, workers, skip_bad_images, log)
    else:
        wait_for_store(out, lambda: (_read_store_meta(out) or {}).get("key") == key, log)
    store = open_store(out)
    if store.skipped and not skip_bad_images:
        raise _bad_images_error([(path, why) for path, why in store.skipped], len(files))
    if store.skipped:
        log(f"the image store {printable(out)} skipped {len(store.skipped)} unreadable image(s)")
    return store


def _build(files: list[tuple[str, int]], classes: list[str], out: Path, key: str, store_size: int,
           workers: int, skip_bad_images: bool, log: Callable[[str], None]) -> None:
    partial = out.parent / f".{out.name}.partial"
    finished = _read_store_meta(partial) if partial.is_dir() else None
    if finished is not None and finished.get("key") == key:  # killed between finishing and moving into place
        _move_into_place(partial, out)
        return
    plan = _load_plan(partial, key)
    if plan is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        log(f"reading the headers of {len(files)} images for the image store {printable(out)}")
        plan = _make_plan([path for path, _ in files], store_size, workers)
        if plan.nbytes == 0:
            raise _bad_images_error([(files[i][0], why) for i, why in sorted(plan.failures.items())], len(files))
        _write_plan(partial, key, plan)
    if plan.failures and not skip_bad_images:  # before hours of decoding; the plan stays for a run that skips
        raise _bad_images_error([(files[i][0], why) for i, why in sorted(plan.failures.items())], len(files))
    chunks = [range(start, min(start + CHUNK_IMAGES, len(files))) for start in range(0, len(files), CHUNK_IMAGES)]
    failures = dict(plan.failures)
    done = _read_progress(partial)
    for chunk_failures in done.values():
        failures.update(chunk_failures)
    todo = [k for k in range(len(chunks)) if k not in done]
    if done:
        log(f"resuming the image store build in {printable(partial)}: {len(done)} of {len(chunks)} chunks done")
    paths = [path for path, _ in files]
    jobs = [_ChunkJob(str(partial / "images.u8"), k, chunks[k].start, paths[chunks[k].start:chunks[k].stop],
                      plan.rows[chunks[k].start:chunks[k].stop], plan.channels, store_size) for k in todo]
    if jobs:
        log(f"decoding {sum(len(job.paths) for job in jobs)} images into {printable(partial)} ({workers} processes)")
    with open(partial / "progress.jsonl", "a") as progress:
        for chunk, chunk_failures in map_in_processes(_store_chunk, jobs, workers, "build image store"):
            progress.write(json.dumps({"chunk": chunk, "failed": chunk_failures}) + "\n")
            progress.flush()
            os.fsync(progress.fileno())
            failures.update(dict(chunk_failures))
            fault_point("store:chunk")
    if failures and not skip_bad_images:  # the finished chunks stay: a run with skip_bad_images completes at once
        raise _bad_images_error([(files[i][0], why) for i, why in sorted(failures.items())], len(files))
    _finish(partial, out, files, classes, key, store_size, plan, failures)


def _build_key(files: list[tuple[str, int]], classes: list[str], store_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": STORE_FORMAT, "size": store_size, "classes": classes}).encode())
    for path, label in files:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # reported (or skipped) when its header is read
            size, mtime = -1, -1
        digest.update(f"{os.path.abspath(path)}\0{label}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is absent, an empty folder or an image store."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        what = "a symbolic link" if out.is_symlink() else "not a folder"
        raise DataError(f"{printable(out)} exists and is {what}: choose another path for the image store")
    if any(out.iterdir()) and not (out / "meta.json").is_file():
        raise DataError(
            f"{printable(out)} is a folder that is not an image store and is not empty: choose another path "
            f"for the image store, or empty it"
        )


def _load_plan(partial: Path, key: str) -> _Plan | None:
    """The plan of an unfinished build of the same inputs in ``partial``, or None (start afresh)."""
    try:
        saved = json.loads((partial / "plan.json").read_text())
        rows = np.load(partial / "rows.npy", allow_pickle=False)
        allocated = (partial / "images.u8").stat().st_size
    except (OSError, ValueError):
        return None
    if saved.get("key") != key or allocated != saved.get("bytes"):
        return None
    failures = {int(i): str(why) for i, why in saved["failures"]}
    return _Plan(rows=rows, channels=int(saved["channels"]), nbytes=int(saved["bytes"]), failures=failures)


def _make_plan(paths: list[str], store_size: int, workers: int) -> _Plan:
    """Read every header (in processes) and lay the images out one after another."""
    jobs = [(paths[start:start + PROBE_CHUNK], store_size) for start in range(0, len(paths), PROBE_CHUNK)]
    heights = np.zeros(len(paths), dtype=np.int64)
    widths = np.zeros(len(paths), dtype=np.int64)
    gray = np.zeros(len(paths), dtype=bool)
    failures: dict[int, str] = {}
    i = 0
    for probed in map_in_processes(_probe_chunk, jobs, workers, "read image headers"):
        for item in probed:
            if isinstance(item, str):
                failures[i] = item
            else:
                heights[i], widths[i], gray[i] = item
            i += 1
    readable = heights > 0
    channels = 1 if gray[readable].all() else 3
    nbytes = channels * heights * widths
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)
    rows = np.stack([offsets, heights, widths], axis=1)
    return _Plan(rows=rows, channels=channels, nbytes=int(nbytes.sum()), failures=failures)


def _write_plan(partial: Path, key: str, plan: _Plan) -> None:
    """Allocate ``images.u8`` in full (so a full disk fails now, not as a SIGBUS mid-build), then the plan."""
    with open(partial / "images.u8", "wb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, plan.nbytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"no space for the image store in {printable(partial.parent)}: it needs "
                    f"{plan.nbytes / 1e9:.2f} GB; free space or build the store elsewhere (or with a smaller "
                    f"store_size)"
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            handle.truncate(plan.nbytes)  # file systems without fallocate: a sparse file
    np.save(partial / "rows.npy", plan.rows)
    failures = [[i, why] for i, why in sorted(plan.failures.items())]
    atomic_write_json(partial / "plan.json", {"key": key, "channels": plan.channels, "bytes": plan.nbytes,
                                               "failures": failures})



def _read_progress(partial: Path) -> dict[int, list[tuple[int, str]]]:
    """Finished chunks -> their failed images, from ``progress.jsonl`` (a line cut short by a kill is ignored)."""
    done: dict[int, list[tuple[int, str]]] = {}
    try:
        lines = (partial / "progress.jsonl").read_text().splitlines()
    except OSError:
        return done
    for line in lines:
        try:
            record = json.loads(line)
            done[int(record["chunk"])] = [(int(i), str(why)) for i, why in record["failed"]]
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _finish(partial: Path, out: Path, files: list[tuple[str, int]], classes: list[str], key: str,
            store_size: int, plan: _Plan, failures: dict[int, str]) -> None:
    """Write the index, labels and (last) meta.json of the kept images, then move the store into place."""
    kept = np.array([i for i in range(len(files)) if i not in failures], dtype=np.int64)
    if len(kept) == 0:
        raise _bad_images_error([(files[i][0], why) for i, why in sorted(failures.items())], len(files))
    np.save(partial / "index.npy", np.ascontiguousarray(plan.rows[kept]))
    np.save(partial / "labels.npy", np.array([files[i][1] for i in kept], dtype=np.int64))
    skipped = [[printable(files[i][0]), why] for i, why in sorted(failures.items())]
    meta = {"kind": STORE_KIND, "format": STORE_FORMAT, "key": key, "classes": classes, "channels": plan.channels,
            "store_size": store_size, "count": len(kept), "bytes": plan.nbytes, "skipped": skipped}
    atomic_write_json(partial / "meta.json", meta)
    _move_into_place(partial, out)


def _move_into_place(partial: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty, or an older store) by the finished ``partial`` folder."""
    for name in ("progress.jsonl", "rows.npy", "plan.json"):  # the build's own records
        (partial / name).unlink(missing_ok=True)
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def _bad_images_error(bad: list[tuple[str, str]], total: int) -> DataError:
    shown = "; ".join(f"{printable(path)} ({why})" for path, why in bad[:5]) + ("; ..." if len(bad) > 5 else "")
    if len(bad) == total:
        return DataError(f"none of the {total} image file(s) could be decoded: {shown}")
    return DataError(
        f"{len(bad)} image file(s) could not be decoded: {shown}. "
        f"Remove or fix them, or pass --skip-bad-images to skip them."
    )


# ------------------------------------------------------------------------------- in the worker processes


class _Refused(Exception):
    """An image this store will not decode; the message is the reason."""


def decode_problem(path: str, exc: BaseException) -> str:
    """Why decoding ``path`` for a store failed with ``exc``, in words (a refusal's own reason, or the file's)."""
    return str(exc) if isinstance(exc, _Refused) else image_problem(path, exc)


def _probe_chunk(job: tuple[list[str], int]) -> list[tuple[int, int, bool] | str]:
    """(height, width, grayscale) each image will have in the store, read from its header; or why not."""
    paths, store_size = job
    out: list[tuple[int, int, bool] | str] = []
    for path in paths:
        try:
            with image_warnings(), Image.open(path) as img:
                height, width = stored_size(img, store_size)
                out.append((height, width, img.mode in GRAY_MODES))
        except Exception as exc:  # noqa: BLE001 - any failure is a per-file message
            out.append(decode_problem(path, exc))
    return out


@contextmanager
def image_warnings() -> Iterator[None]:
    """Around PIL calls on untrusted files: harmless warnings silenced, decompression-bomb warnings raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's "Corrupt EXIF data" etc.: a file either decodes or not
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def stored_size(img: Image.Image, store_size: int | None) -> tuple[int, int]:
    """The upright (height, width) of an opened ``img`` in a store: shorter side at most ``store_size`` (None:
    full size), never enlarged; read from the header only. An image a store refuses (no pixels, a
    decompression bomb) raises an exception whose reason :func:`decode_problem` gives."""
    width, height = img.size
    if width < 1 or height < 1:
        raise _Refused(f"its header claims {width}x{height} pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise _Refused(
            f"its header claims {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel decompression-bomb limit"
        )
    if header_orientation(img) in SWAPPING_ORIENTATIONS:
        width, height = height, width
    shorter = min(width, height)
    if store_size is None or shorter <= store_size:
        return height, width
    scale = store_size / shorter
    return max(1, round(height * scale)), max(1, round(width * scale))


class _ChunkJob(NamedTuple):
    """One decoding job: images ``first`` to ``first + len(paths) - 1`` and their plan rows."""

    data_path: str
    chunk: int
    first: int
    paths: list[str]
    rows: np.ndarray  # offset, height, width (height 0: its header was unreadable, nothing to decode)
    channels: int
    store_size: int


def _store_chunk(job: _ChunkJob) -> tuple[int, list[tuple[int, str]]]:
    """Decode one chunk into the store file at the planned offsets; returns (chunk, [(index, why failed)])."""
    channels = job.channels
    ends = job.rows[:, 0] + channels * job.rows[:, 1] * job.rows[:, 2]
    start, end = int(job.rows[0, 0]), int(ends.max())
    if end == start:
        return job.chunk, []
    data = np.memmap(job.data_path, dtype=np.uint8, mode="r+", offset=start, shape=(end - start,))
    failed: list[tuple[int, str]] = []
    for i, (path, (offset, height, width)) in enumerate(zip(job.paths, job.rows.tolist()), start=job.first):
        if height == 0:
            continue
        slot = data[offset - start:offset - start + channels * height * width].reshape(height, width, channels)
        try:
            slot[...] = decode_upright(path, (height, width), channels, job.store_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a per-file message
            slot[...] = 0  # a retried chunk must leave the same bytes as a first try
            failed.append((i, decode_problem(path, exc)))
    data.flush()
    del data
    return job.chunk, failed


def decode_upright(path: str, size: tuple[int, int], channels: int, store_size: int | None) -> np.ndarray:
    """Decode ``path`` to uint8 (H, W, channels) of exactly ``size`` (what :func:`stored_size` gave for this
    ``store_size``), upright (EXIF orientation), 16-bit scaled to 8, transparency composited on white.
    Failures raise; :func:`decode_problem` says why in words."""
    height, width = size
    with image_warnings(), Image.open(path) as img:
        if stored_size(img, store_size) != size:
            raise _Refused(f"it changed while the store was being built (now {img.width}x{img.height}): build again")
        swapped = header_orientation(img) in SWAPPING_ORIENTATIONS
        # JPEG only (a no-op elsewhere): decode at the smallest 1/2, 1/4 or 1/8 scale still >= the target.
        img.draft("RGB", (height, width) if swapped else (width, height))
        drafted = img.size
        upright = ImageOps.exif_transpose(img)
    if upright.size != (drafted[::-1] if swapped else drafted):
        raise _Refused("its EXIF orientation is stored after the image data, where the header read missed it")
    upright = flatten_alpha(to_8bit(upright)).convert("L" if channels == 1 else "RGB")
    if upright.size != (width, height):
        # Lanczos is the sharpest of PIL's antialiasing filters for shrinking photos; reducing_gap=3 first
        # box-shrinks by a whole factor to within 3x of the target (fast), which looks the same.
        upright = upright.resize((width, height), Image.LANCZOS, reducing_gap=3.0)
    array = np.asarray(upright, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array
