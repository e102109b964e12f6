"""Small builders shared by the tests: fixture image folders, IDX and CIFAR files, CLI runner."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tiny synthetic data for fast training runs: 3 classes of noisy 8x8 RGB templates.
TINY_SYNTH = "synthetic:classes=3,size=8,train=64,test=32"


def run_cli(*args: object, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m convforge ARGS`` in ``cwd`` with the current environment (CONVFORGE_CACHE included)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "convforge", *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def save_image(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array in the format given by the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(np.ascontiguousarray(array), mode).save(path)
    return path


def random_images(count: int, size: tuple[int, int], channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (count, *size) if channels == 1 else (count, *size, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def colour_photos(root: Path, per_class: dict[str, int], sizes: Sequence[tuple[int, int]], noise: int = 40,
                  seed: int = 0) -> Path:
    """An image folder ``root/<split>/{blue,green,red}/<i>.png`` of ``per_class[split]`` images per class, told
    apart by their mean colour (plus uniform noise of +/- ``noise``), sized in turn from ``sizes`` (h, w)."""
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, count in per_class.items():
        for name, colour in colours.items():
            for i in range(count):
                h, w = sizes[i % len(sizes)]
                jitter = rng.integers(-noise, noise, size=(h, w, 3))
                save_image(root / split / name / f"{i}.png",
                           np.clip(np.array(colour)[None, None] + jitter, 0, 255).astype(np.uint8))
    return root


def make_image_folder(
    root: Path,
    splits: dict[str, int] | None = None,
    classes: Sequence[str] = ("cat", "dog", "fish"),
    size: tuple[int, int] = (8, 8),
    exts: Iterable[str] = (".png",),
    channels: int = 3,
    seed: int = 0,
) -> dict[str, list[tuple[Path, int, np.ndarray]]]:
    """``root/<split>/<class>/img<i><ext>`` for each split; returns (path, label, pixels) in load order.

    Files of each class are named so that sorted order is creation order; extensions cycle
    through ``exts``.
    """
    splits = splits or {"train": 3, "test": 2}
    exts = list(exts)
    written: dict[str, list[tuple[Path, int, np.ndarray]]] = {}
    for s_index, (split, per_class) in enumerate(splits.items()):
        items = []
        for label, name in enumerate(classes):
            arrays = random_images(per_class, size, channels, seed=seed * 1000 + s_index * 100 + label)
            for i, array in enumerate(arrays):
                path = save_image(root / split / name / f"img{i:03d}{exts[i % len(exts)]}", array)
                items.append((path, label, array))
        written[split] = items
    return written


def to_chw(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An IDX file of uint8 data: magic 0x000008NN (NN = rank), big-endian dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist_idx(root: Path, train: int = 6, test: int = 4, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(count,), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[split] = (images, labels)
    return out


def write_cifar10_batches(root: Path, per_batch: int = 3, test: int = 4, seed: int = 0,
                          label_names: Sequence[str] | None = None) -> dict:
    """CIFAR-10 python batches: dicts with b"data" uint8 (N, 3072) rows (R plane, G plane, B plane) and b"labels"."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[tuple[np.ndarray, list[int]]]] = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test if name == "test_batch" else per_batch
        rows = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=count)]
        with open(root / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": rows, b"labels": labels,
                         b"filenames": [b"x.png"] * count}, handle, protocol=2)
        out["test" if name == "test_batch" else "train"].append((rows, labels))
    names_list = list(label_names) if label_names is not None else [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [n.encode() for n in names_list], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, handle, protocol=2)
    return out


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ranks_match_single(single, per_rank) -> None:
    """Two ranks' batches together hold each batch of one process, every sample viewed identically."""
    import torch

    for k, (x, y) in enumerate(single):
        xs = torch.cat([per_rank[0][k][0], per_rank[1][k][0]])
        ys = torch.cat([per_rank[0][k][1], per_rank[1][k][1]])
        assert sorted(ys.tolist()) == sorted(y.tolist())
        for label in y.tolist():
            assert torch.equal(x[y == label], xs[ys == label])


def headless_chromium(window: str = "1280,900"):
    """A Selenium WebDriver on headless Chromium; skips the test where Chromium is absent (fails under CI)."""
    import pytest

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("headless Chromium not installed: apt-get install chromium chromium-driver (or make browser)")
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", f"--window-size={window}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)
