"""The on-disk decoding cache shared by image folders and segmentation folders.

An entry is a directory ``<cache>/<kind>/<name>-<key>`` holding ``<split>_images.npy`` (uint8, N x C x H x W),
``<split>_labels.npy`` (class indices or masks) and ``meta.json``; it appears atomically (written under a
temporary name, then renamed), so a crash or a concurrent writer never leaves a half-written entry behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from convforge.data.dataset import Split
from convforge.fileio import permission_bits

# Caches larger than this are memory-mapped rather than read into memory.
MMAP_THRESHOLD_BYTES = int(os.environ.get("CONVFORGE_MMAP_THRESHOLD", str(4 * 1024**3)))

Job = TypeVar("Job")
Result = TypeVar("Result")


def default_cache_dir() -> Path:
    """``$CONVFORGE_CACHE`` or ``~/.cache/convforge``."""
    root = os.environ.get("CONVFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "convforge")
    return Path(root)


def map_in_processes(
    fn: Callable[[Job], Result], jobs: list[Job], workers: int, label: str
) -> Iterator[Result]:
    """``map(fn, jobs)`` in order, in ``workers`` processes when there is more than one job, with a progress bar."""
    from convforge.progress import progress_iter

    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(jobs) > 1 else None
    mapped = pool.map(fn, jobs) if pool is not None else map(fn, jobs)
    try:
        yield from progress_iter(mapped, total=len(jobs), label=label)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def write_entry(entry: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict[str, Any]) -> None:
    """Write ``{split: (images, labels)}`` and ``meta`` as the cache entry ``entry``, atomically."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        tmp.chmod(permission_bits(0o777))  # mkdtemp makes it private; the cache is as shared as its parent
        for split, (images, labels) in arrays.items():
            np.save(tmp / f"{split}_images.npy", images)
            np.save(tmp / f"{split}_labels.npy", labels)
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


def read_meta(entry: Path) -> dict[str, Any] | None:
    """The entry's metadata, or None when the entry does not exist (yet)."""
    path = entry / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def open_split(entry: Path, split: str) -> Split:
    """One split of a cache entry as tensors (memory-mapped when large)."""
    path = entry / f"{split}_images.npy"
    # Small caches are read in one sequential pass: random-order batches from a cold memory map
    # would cost one disk seek per image. Larger ones are memory-mapped (copy-on-write, so writable).
    mmap = "c" if path.stat().st_size > MMAP_THRESHOLD_BYTES else None
    images = np.load(path, mmap_mode=mmap, allow_pickle=False)
    labels = np.load(entry / f"{split}_labels.npy", allow_pickle=False)
    return Split(torch.from_numpy(images), torch.from_numpy(labels))
