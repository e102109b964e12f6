"""The decoded-image cache of image folders: created once, hit afterwards, invalidated by file changes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import convforge.data.imagefolder as imagefolder
from convforge.data import load
from helpers import make_image_folder, random_images, save_image


def _entries(cache_dir):
    folder = cache_dir / "imagefolder"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_first_load_creates_entry_second_is_hit(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "pets"
    make_image_folder(root, {"train": 3, "test": 2}, classes=("a", "b"))
    assert _entries(cache_dir) == []
    first = load(f"imagefolder:{root}")
    entries = _entries(cache_dir)
    assert len(entries) == 1 and entries[0].startswith("pets-")
    entry = cache_dir / "imagefolder" / entries[0]
    assert (entry / "meta.json").is_file()
    assert (entry / "train_images.npy").is_file() and (entry / "test_labels.npy").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decode_files called on a cache hit")

    monkeypatch.setattr(imagefolder, "decode_files", no_decoding)
    second = load(f"imagefolder:{root}")
    assert _entries(cache_dir) == entries
    for split in ("train", "test"):
        assert torch.equal(first.split(split).images, second.split(split).images)
        assert torch.equal(first.split(split).labels, second.split(split).labels)
    assert second.classes == first.classes
    # hit tensors are usable (writable) like fresh ones
    second.train.images[0].zero_()


def test_cache_dir_argument_overrides_environment(tmp_path, cache_dir):
    root = tmp_path / "pets"
    make_image_folder(root, {"train": 2, "test": 1}, classes=("a", "b"))
    own = tmp_path / "own-cache"
    load(f"imagefolder:{root}", cache_dir=own)
    assert len(_entries(own)) == 1
    assert _entries(cache_dir) == []


def test_modified_file_is_a_miss(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "pets"
    written = make_image_folder(root, {"train": 3, "test": 2}, classes=("a", "b"))
    first = load(f"imagefolder:{root}")
    assert len(_entries(cache_dir)) == 1

    path, label, _ = written["train"][0]
    new_pixels = np.full((8, 8, 3), 7, dtype=np.uint8)
    save_image(path, new_pixels)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))

    calls = []
    real = imagefolder.decode_files

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(imagefolder, "decode_files", counting)
    second = load(f"imagefolder:{root}")
    assert calls, "a changed file must be decoded again"
    assert len(_entries(cache_dir)) == 2
    assert (second.train.images[0] == 7).all()
    assert not torch.equal(first.train.images[0], second.train.images[0])


def test_touch_alone_is_a_miss(tmp_path, cache_dir):
    root = tmp_path / "pets"
    written = make_image_folder(root, {"train": 2, "test": 1}, classes=("a", "b"))
    load(f"imagefolder:{root}")
    path = written["test"][0][0]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load(f"imagefolder:{root}")
    assert len(_entries(cache_dir)) == 2


def test_added_file_and_options_are_misses(tmp_path, cache_dir):
    root = tmp_path / "pets"
    make_image_folder(root, {"train": 2, "test": 1}, classes=("a", "b"))
    load(f"imagefolder:{root}")
    save_image(root / "train" / "a" / "zzz.png", random_images(1, (8, 8))[0])
    assert len(load(f"imagefolder:{root}").train) == 5
    assert len(_entries(cache_dir)) == 2
    assert load(f"imagefolder:{root}", image_size=4).image_size == (4, 4)
    assert len(_entries(cache_dir)) == 3


def test_asking_for_the_images_own_size_reuses_their_entry(tmp_path, cache_dir, monkeypatch):
    """--image-size equal to the size every image has (e.g. a checkpoint's input size) is the native entry."""
    root = tmp_path / "pets"
    make_image_folder(root, {"train": 3, "test": 2}, classes=("a", "b"), size=(8, 8))
    native = load(f"imagefolder:{root}")
    monkeypatch.setattr(imagefolder, "decode_files", lambda *a, **k: pytest.fail("decoded again"))
    sized = load(f"imagefolder:{root}", image_size=(8, 8))
    assert len(_entries(cache_dir)) == 1 and sized.image_size == (8, 8)
    assert torch.equal(sized.train.images, native.train.images)


def test_failed_decode_writes_no_entry(tmp_path, cache_dir):
    root = tmp_path / "pets"
    make_image_folder(root, {"train": 2, "test": 1}, classes=("a", "b"))
    (root / "train" / "a" / "broken.png").write_bytes(b"not a png")
    from convforge.errors import DataError

    with pytest.raises(DataError):
        load(f"imagefolder:{root}")
    assert _entries(cache_dir) == []
    assert not any((cache_dir / "imagefolder").glob(".*")), "no temporary folder may be left"
