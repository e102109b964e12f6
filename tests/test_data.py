"""Every data format convforge reads, built as small fixture files in temporary folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convforge.data import Dataset, channel_stats, load, parse_spec
from convforge.data.dataset import Split, convert_channels
from convforge.errors import DataError
from helpers import make_image_folder, random_images, save_image, to_chw, write_cifar10_batches, write_mnist_idx

# ---------------------------------------------------------------- MNIST IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_idx(tmp_path, gz):
    written = write_mnist_idx(tmp_path, train=6, test=4, gz=gz)
    data = load(f"mnist:{tmp_path}")
    assert data.classes == [str(d) for d in range(10)]
    assert data.channels == 1 and data.image_size == (28, 28)
    for split in ("train", "test"):
        images, labels = written[split]
        got = data.split(split)
        assert got.images.dtype == torch.uint8 and got.images.shape == (len(images), 1, 28, 28)
        assert np.array_equal(got.images[:, 0].numpy(), images)
        assert got.labels.tolist() == labels.tolist()
    assert data.default_augment == "crop"
    assert data.val is None


def test_mnist_idx_in_raw_subfolder(tmp_path):
    written = write_mnist_idx(tmp_path / "MNIST" / "raw", train=3, test=2, gz=True)
    data = load(f"mnist:{tmp_path}")
    assert data.train.labels.tolist() == written["train"][1].tolist()


def test_mnist_idx_truncated_is_an_error(tmp_path):
    write_mnist_idx(tmp_path, train=4, test=2)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated") as info:
        load(f"mnist:{tmp_path}")
    assert str(path) in str(info.value)


def test_mnist_idx_bad_magic_is_an_error(tmp_path):
    write_mnist_idx(tmp_path, train=4, test=2)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(DataError, match="magic"):
        load(f"mnist:{tmp_path}")


def _mnist_png_tree(root, per_class=2):
    digits = [str(d) for d in range(10)]
    return make_image_folder(root, {"train": per_class, "test": 1}, classes=digits, size=(28, 28), channels=1)


@pytest.mark.parametrize("nested", [False, True], ids=["DIR/train", "DIR/mnist/train"])
def test_mnist_png_folders(tmp_path, nested):
    written = _mnist_png_tree(tmp_path / "mnist" if nested else tmp_path)
    data = load(f"mnist:{tmp_path}")
    assert data.classes == [str(d) for d in range(10)]
    assert data.channels == 1 and data.image_size == (28, 28)
    assert len(data.train) == 20 and len(data.test) == 10
    for split in ("train", "test"):
        got = data.split(split)
        assert got.labels.tolist() == [label for _, label, _ in written[split]]
        expected = np.stack([to_chw(a) for _, _, a in written[split]])
        assert np.array_equal(got.images.numpy(), expected)
    assert data.default_augment == "crop"


def test_mnist_dir_without_data(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError, match="no MNIST data"):
        load(f"mnist:{tmp_path}")


# ---------------------------------------------------------------- CIFAR-10 python batches


def test_cifar10_batches(tmp_path):
    written = write_cifar10_batches(tmp_path, per_batch=3, test=4)
    data = load(f"cifar10:{tmp_path}")
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    assert len(data.train) == 15 and len(data.test) == 4
    assert data.channels == 3 and data.image_size == (32, 32)
    train_rows = np.concatenate([rows for rows, _ in written["train"]])
    train_labels = sum((labels for _, labels in written["train"]), [])
    assert data.train.labels.tolist() == train_labels
    assert data.test.labels.tolist() == written["test"][0][1]
    images = data.train.images.numpy()
    for i in range(len(train_rows)):
        # row layout: 1024 red values, then 1024 green, then 1024 blue, each a 32x32 image row by row
        assert np.array_equal(images[i, 0], train_rows[i, :1024].reshape(32, 32))
        assert np.array_equal(images[i, 1], train_rows[i, 1024:2048].reshape(32, 32))
        assert np.array_equal(images[i, 2], train_rows[i, 2048:].reshape(32, 32))
    assert data.default_augment == "crop-flip"


def test_cifar10_pixel_order_with_known_image(tmp_path):
    """A pure red image with a bright top-left pixel must come out red in channel 0, at (0, 0)."""
    write_cifar10_batches(tmp_path, per_batch=1, test=1)
    import pickle

    row = np.zeros(3072, dtype=np.uint8)
    row[:1024] = 200       # red plane
    row[1] = 255           # red, row 0, column 1
    row[1024 + 32] = 77    # green, row 1, column 0
    with open(tmp_path / "test_batch", "wb") as handle:
        pickle.dump({b"data": row[None], b"labels": [3]}, handle, protocol=2)
    image = load(f"cifar10:{tmp_path}").test.images[0]
    assert image[0, 0, 0] == 200 and image[0, 0, 1] == 255
    assert image[1, 1, 0] == 77 and image[1].sum() == 77
    assert image[2].sum() == 0


def test_cifar10_in_batches_py_subfolder_with_custom_names(tmp_path):
    names = [f"c{i}" for i in range(10)]
    write_cifar10_batches(tmp_path / "cifar-10-batches-py", per_batch=2, test=2, label_names=names)
    data = load(f"cifar10:{tmp_path}")
    assert data.classes == names
    assert len(data.train) == 10


def test_cifar10_missing_batches(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 batch files"):
        load(f"cifar10:{tmp_path}")
    write_cifar10_batches(tmp_path, per_batch=2, test=2)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load(f"cifar10:{tmp_path}")


def test_cifar10_wrong_row_length(tmp_path):
    import pickle

    write_cifar10_batches(tmp_path, per_batch=2, test=2)
    with open(tmp_path / "data_batch_2", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle, protocol=2)
    with pytest.raises(DataError, match="3072") as info:
        load(f"cifar10:{tmp_path}")
    assert "data_batch_2" in str(info.value)


# ---------------------------------------------------------------- image folders


def test_imagefolder_png_jpg_bmp_train_test(tmp_path):
    written = make_image_folder(tmp_path, {"train": 3, "test": 3}, classes=("a", "b"), size=(8, 8),
                                exts=(".png", ".jpg", ".bmp"))
    data = load(f"imagefolder:{tmp_path}")
    assert data.classes == ["a", "b"]
    assert data.channels == 3 and data.image_size == (8, 8)
    assert len(data.train) == 6 and len(data.test) == 6 and data.val is None
    for split in ("train", "test"):
        got = data.split(split)
        assert got.labels.tolist() == [label for _, label, _ in written[split]]
        for i, (path, _, array) in enumerate(written[split]):
            pixels = got.images[i].numpy()
            if path.suffix == ".jpg":  # lossy: close, not equal
                assert np.abs(pixels.astype(int) - to_chw(array).astype(int)).mean() < 60
            else:
                assert np.array_equal(pixels, to_chw(array)), path
    assert data.default_augment == "crop-flip"
    assert data.describe()["train"] == 6


def test_imagefolder_train_and_val_only(tmp_path):
    written = make_image_folder(tmp_path, {"train": 2, "val": 2}, classes=("x", "y"))
    data = load(f"imagefolder:{tmp_path}")
    # with no test/ folder, val is what the model is tested on
    assert data.val is None
    assert data.test.labels.tolist() == [label for _, label, _ in written["val"]]
    assert np.array_equal(data.test.images[0].numpy(), to_chw(written["val"][0][2]))


def test_imagefolder_train_val_test(tmp_path):
    make_image_folder(tmp_path, {"train": 2, "val": 1, "test": 2}, classes=("x", "y"))
    data = load(f"imagefolder:{tmp_path}")
    assert len(data.train) == 4 and len(data.val) == 2 and len(data.test) == 4


def test_imagefolder_eval_only(tmp_path):
    make_image_folder(tmp_path, {"test": 2}, classes=("x", "y"))
    data = load(f"imagefolder:{tmp_path}")
    assert data.train is None and len(data.test) == 4
    assert any("no train split" in note for note in data.notes)


def test_imagefolder_class_union_and_ignored_files(tmp_path):
    make_image_folder(tmp_path, {"train": 2, "test": 1}, classes=("a", "b"))
    save_image(tmp_path / "test" / "c" / "only_in_test.png", random_images(1, (8, 8))[0])
    (tmp_path / "train" / "a" / "README.txt").write_text("not an image")
    # a class that exists only in test gets an index, but train must then have it too
    with pytest.raises(DataError, match="class folder\\(s\\) with no usable image in .*train: c"):
        load(f"imagefolder:{tmp_path}")
    save_image(tmp_path / "train" / "c" / "x.png", random_images(1, (8, 8))[0])
    data = load(f"imagefolder:{tmp_path}")
    assert data.classes == ["a", "b", "c"]
    assert any("ignored 1" in note for note in data.notes)


def test_imagefolder_resize_to_most_common_size(tmp_path):
    make_image_folder(tmp_path, {"train": 3, "test": 2}, classes=("a", "b"), size=(8, 8))
    save_image(tmp_path / "train" / "a" / "big.png", random_images(1, (16, 12))[0])
    data = load(f"imagefolder:{tmp_path}")
    assert data.image_size == (8, 8) and len(data.train) == 7
    assert any("differ in size" in note for note in data.notes)
    resized = load(f"imagefolder:{tmp_path}", image_size=4)
    assert resized.image_size == (4, 4) and len(resized.train) == 7


# ---------------------------------------------------------------- digits, synthetic, specs


def test_digits():
    data = load("digits")
    assert len(data.train) == 1437 and len(data.test) == 360
    assert data.classes == [str(d) for d in range(10)]
    assert data.channels == 1 and data.image_size == (8, 8)
    assert data.train.images.max() == 255 and data.train.images.min() == 0
    # stratified: every class in both splits
    assert set(data.test.labels.tolist()) == set(range(10))
    assert data.default_augment == "none"
    assert len(data.mean) == 1 and 0 < data.mean[0] < 1 and data.std[0] > 0


def test_synthetic_defaults_and_options():
    data = load("synthetic")
    assert data.num_classes == 10 and data.channels == 3 and data.image_size == (16, 16)
    assert len(data.train) == 512 and len(data.test) == 128
    small = load("synthetic:classes=3,size=8")
    assert small.classes == ["class0", "class1", "class2"] and small.image_size == (8, 8)
    assert set(small.train.labels.tolist()) == {0, 1, 2}
    custom = load("synthetic:classes=2,size=4,channels=1,train=10,test=6,seed=5")
    assert custom.channels == 1 and len(custom.train) == 10 and len(custom.test) == 6
    # deterministic for a seed, different across seeds
    again = load("synthetic:classes=2,size=4,channels=1,train=10,test=6,seed=5")
    assert torch.equal(custom.train.images, again.train.images)
    other = load("synthetic:classes=2,size=4,channels=1,train=10,test=6,seed=6")
    assert not torch.equal(custom.train.images, other.train.images)


@pytest.mark.parametrize("spec,match", [
    ("synthetic:colors=3", "bad synthetic option 'colors=3'"),
    ("synthetic:classes", "bad synthetic option"),
    ("synthetic:size=big", "must be an integer"),
])
def test_synthetic_bad_options(spec, match):
    with pytest.raises(DataError, match=match):
        load(spec)


def test_parse_spec():
    assert parse_spec("imagefolder:/x/y") == ("imagefolder", "/x/y")
    assert parse_spec("Digits") == ("digits", "")
    with pytest.raises(DataError, match="needs a directory"):
        parse_spec("cifar10")
    with pytest.raises(DataError, match="unknown data spec 'imagenet'"):
        parse_spec("imagenet")


def test_unknown_spec_that_is_a_folder_suggests_imagefolder(tmp_path):
    with pytest.raises(DataError, match=f"imagefolder:{tmp_path}"):
        load(str(tmp_path))


def test_channel_stats_and_convert_channels():
    images = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    images[:, 1] = 255
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.0, 1.0))
    assert all(s >= 1e-3 for s in std)
    gray = torch.full((1, 1, 2, 2), 100, dtype=torch.uint8)
    assert convert_channels(gray, 3).shape == (1, 3, 2, 2) and (convert_channels(gray, 3) == 100).all()
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    assert convert_channels(rgb, 1).item() == round(0.299 * 255)


def test_split_and_dataset_validation():
    with pytest.raises(ValueError, match="uint8"):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    split = Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    data = Dataset(spec="x", classes=["a"], train=None, test=split)
    with pytest.raises(KeyError, match="no 'val' split"):
        data.split("val")
