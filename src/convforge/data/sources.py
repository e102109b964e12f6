"""Dataset sources that need no decoding cache: scikit-learn digits, MNIST IDX, CIFAR-10 batches, synthetic."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from convforge.data.dataset import Split
from convforge.data.paths import printable
from convforge.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_digits_splits(test_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], dict[str, Split]]:
    """scikit-learn's bundled 8x8 digits (1,797 images), split into train and a stratified held-out test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are 0..16; scale to 0..255 without loss of order.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    splits = {
        "train": Split(torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])),
        "test": Split(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx])),
    }
    return [str(d) for d in range(10)], splits


# ---------------------------------------------------------------- MNIST (IDX)

_IDX_NAMES = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def find_idx_files(root: Path) -> dict[tuple[str, str], Path] | None:
    """The four MNIST IDX files (plain or .gz) in ``root`` or ``root/raw``, or None if any is missing."""
    found: dict[tuple[str, str], Path] = {}
    for key, names in _IDX_NAMES.items():
        for folder in (root, root / "raw", root / "MNIST" / "raw"):
            hit = next((folder / (n + ext) for n in names for ext in ("", ".gz") if (folder / (n + ext)).is_file()), None)
            if hit:
                found[key] = hit
                break
    return found if len(found) == 4 else None


_READ_CHUNK = 64 * 1024 * 1024


def _read_upto(handle, size: int) -> bytes:
    """At most ``size`` bytes, read in chunks (one huge ``read(size)`` would allocate ``size`` bytes first)."""
    parts = bytearray()
    while len(parts) < size:
        chunk = handle.read(min(_READ_CHUNK, size - len(parts)))
        if not chunk:
            break
        parts += chunk
    return bytes(parts)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (uint8 data, any rank); ``.gz`` files are decompressed.

    The header's dimensions must match the data exactly. No more than the header promises (plus
    one byte, to detect padding) is ever read or decompressed, so a gzip bomb cannot fill memory.
    """
    shown = printable(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            start = _read_upto(handle, 4)
            if len(start) < 4 or start[0] != 0 or start[1] != 0:
                raise DataError(f"{shown} is not an IDX file (bad magic number): re-download it")
            dtype_code, ndim = start[2], start[3]
            if dtype_code != 0x08:
                raise DataError(f"{shown}: only unsigned-byte IDX data is supported (type code 0x{dtype_code:02x})")
            if ndim == 0:
                raise DataError(f"{shown}: the IDX header gives no dimensions: re-download it")
            raw_dims = _read_upto(handle, 4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{shown} is truncated (header): re-download it")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            expected = math.prod(dims)
            data = _read_upto(handle, expected + 1)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        kind = "a valid gzip file" if path.suffix == ".gz" else "readable"
        raise DataError(f"{shown} is not {kind}: {printable(str(exc))}. Re-download it") from None
    if len(data) != expected:
        what = "padded" if len(data) > expected else "truncated"
        raise DataError(
            f"{shown} is {what}: its header says {dims} = {expected} bytes of data, the file has "
            f"{'more' if len(data) > expected else len(data)}. Re-download it"
        )
    try:
        return np.frombuffer(data, dtype=np.uint8).reshape(dims)
    except ValueError:  # e.g. (0, 2**32-1, 2**32-1): no data, but a shape numpy cannot represent
        raise DataError(f"{shown}: the IDX header's dimensions {dims} are not usable: re-download it") from None


def load_mnist_idx(files: dict[tuple[str, str], Path]) -> tuple[list[str], dict[str, Split]]:
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[(split, "images")])
        labels = read_idx(files[(split, "labels")]).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match "
                f"({printable(files[(split, 'images')])}, {printable(files[(split, 'labels')])})"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{printable(files[(split, 'labels')])}: label {labels.max()} is not a digit")
        splits[split] = Split(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels))
    return [str(d) for d in range(10)], splits


# ---------------------------------------------------------------- CIFAR-10 (python batches)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global is refused, so no code runs."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Python 3 writes bytes (e.g. an array's raw data) in protocol 2 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


def read_cifar_batch(path: Path) -> dict:
    """One CIFAR pickle, unpickled without running code from it (numpy arrays and plain containers only)."""
    shown = printable(path)
    try:
        with open(path, "rb") as handle:
            obj = _ArrayOnlyUnpickler(io.BufferedReader(handle), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"refused to read {shown}: {printable(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle can fail in any way; each is this one error
        raise DataError(
            f"{shown} is not a readable CIFAR batch file ({type(exc).__name__}: {printable(str(exc))[:200]}): "
            f"re-download the python version of CIFAR-10"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{shown} does not hold a CIFAR batch (a dict with 'data' and 'labels')")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _batch_arrays(batch: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    shown = printable(path)
    try:
        rows = np.asarray(batch.get("data"))
    except (ValueError, TypeError, OverflowError, MemoryError):
        rows = np.asarray(None)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        raise DataError(f"{shown}: 'data' must be uint8 rows of 3072 values, got {rows.dtype} {rows.shape}")
    raw_labels = batch.get("labels")
    try:
        labels = np.asarray(raw_labels, dtype=np.int64)
    except (ValueError, TypeError, OverflowError, MemoryError):
        raise DataError(f"{shown}: 'labels' must be a list of class indices, got {type(raw_labels).__name__}") from None
    if labels.shape != (rows.shape[0],):
        raise DataError(f"{shown}: {rows.shape[0]} images but {labels.size} labels")
    return rows, labels


def _label_names(path: Path) -> list[str] | None:
    names = read_cifar_batch(path).get("label_names")
    if names is None or (isinstance(names, (list, tuple)) and not names):
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{printable(path)}: 'label_names' must be a list of class names: fix or remove the file")
    return [printable(n.decode("utf-8", "backslashreplace") if isinstance(n, bytes) else n) for n in names]


def load_cifar10_batches(root: Path) -> tuple[list[str], dict[str, Split]]:
    """CIFAR-10's official python version: data_batch_1..5 and test_batch (uint8 rows of 3x32x32)."""
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            root = candidate
            break
    else:
        raise DataError(
            f"no CIFAR-10 batch files in {printable(root)}: expected data_batch_1..5 and test_batch "
            f"(the python version of CIFAR-10), or use imagefolder:DIR for image folders"
        )
    names = {"train": sorted(root.glob("data_batch_*")), "test": [root / "test_batch"]}
    splits = {}
    for split, paths in names.items():
        data, labels = [], []
        for path in paths:
            if not path.is_file():
                raise DataError(f"missing CIFAR-10 file: {printable(path)}")
            rows, batch_labels = _batch_arrays(read_cifar_batch(path), path)
            data.append(rows.reshape(-1, 3, 32, 32))
            labels.append((batch_labels, path))
        splits[split] = (data, labels)
    classes = list(CIFAR10_CLASSES)
    meta = root / "batches.meta"
    if meta.is_file():
        classes = _label_names(meta) or classes
    out = {}
    for split, (data, labels) in splits.items():
        for batch_labels, path in labels:
            if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= len(classes)):
                bad = batch_labels.min() if batch_labels.min() < 0 else batch_labels.max()
                raise DataError(
                    f"{printable(path)}: label {bad} is not a class index 0..{len(classes) - 1} "
                    f"({len(classes)} classes): re-download the file"
                )
        out[split] = Split(torch.from_numpy(np.concatenate(data)),
                           torch.from_numpy(np.concatenate([lab for lab, _ in labels])))
    return classes, out


# ---------------------------------------------------------------- synthetic


def load_synthetic(
    num_classes: int = 10, size: int = 16, channels: int = 3, train: int = 512, test: int = 128, seed: int = 0
) -> tuple[list[str], dict[str, Split]]:
    """A learnable toy task for smoke tests: each class is a noisy copy of its own random template."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, channels, size, size, generator=gen) * 255
    splits = {}
    for split, count in (("train", train), ("test", test)):
        labels = torch.randint(0, num_classes, (count,), generator=gen)
        noise = torch.randn(count, channels, size, size, generator=gen) * 40
        images = (templates[labels] + noise).clamp(0, 255).to(torch.uint8)
        splits[split] = Split(images, labels)
    return [f"class{i}" for i in range(num_classes)], splits
