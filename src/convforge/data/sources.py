"""Dataset sources that need no decoding cache: scikit-learn digits, MNIST IDX, CIFAR-10 batches, synthetic."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from convforge.data.dataset import Split
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


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (uint8 data, any rank); ``.gz`` files are decompressed."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is not a valid gzip file: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: only unsigned-byte IDX data is supported (type code 0x{dtype_code:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or padded: header says {dims} = {expected} bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(files: dict[tuple[str, str], Path]) -> tuple[list[str], dict[str, Split]]:
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[(split, "images")])
        labels = read_idx(files[(split, "labels")]).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match "
                f"({files[(split, 'images')]}, {files[(split, 'labels')]})"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{files[(split, 'labels')]}: label {labels.max()} is not a digit")
        splits[split] = Split(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels))
    return [str(d) for d in range(10)], splits


# ---------------------------------------------------------------- CIFAR-10 (python batches)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global is refused, so no code runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Python 3 writes bytes (e.g. an array's raw data) in protocol 2 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


def read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            obj = _ArrayOnlyUnpickler(io.BufferedReader(handle), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"refused to read {path}: {exc}") from None
    except Exception as exc:
        raise DataError(f"{path} is not a readable CIFAR batch file: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR batch (a dict with 'data' and 'labels')")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def load_cifar10_batches(root: Path) -> tuple[list[str], dict[str, Split]]:
    """CIFAR-10's official python version: data_batch_1..5 and test_batch (uint8 rows of 3x32x32)."""
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            root = candidate
            break
    else:
        raise DataError(
            f"no CIFAR-10 batch files in {root}: expected data_batch_1..5 and test_batch "
            f"(the python version of CIFAR-10), or use imagefolder:DIR for image folders"
        )
    names = {"train": sorted(root.glob("data_batch_*")), "test": [root / "test_batch"]}
    splits = {}
    for split, paths in names.items():
        data, labels = [], []
        for path in paths:
            if not path.is_file():
                raise DataError(f"missing CIFAR-10 file: {path}")
            batch = read_cifar_batch(path)
            rows = np.asarray(batch.get("data"))
            if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
                raise DataError(f"{path}: 'data' must be uint8 rows of 3072 values, got {rows.dtype} {rows.shape}")
            batch_labels = np.asarray(batch.get("labels"), dtype=np.int64)
            if batch_labels.shape != (rows.shape[0],):
                raise DataError(f"{path}: {rows.shape[0]} images but {batch_labels.size} labels")
            data.append(rows.reshape(-1, 3, 32, 32))
            labels.append(batch_labels)
        splits[split] = Split(torch.from_numpy(np.concatenate(data)), torch.from_numpy(np.concatenate(labels)))
    classes = list(CIFAR10_CLASSES)
    meta = root / "batches.meta"
    if meta.is_file():
        names_raw = read_cifar_batch(meta).get("label_names")
        if names_raw:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_raw]
    return classes, splits


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
