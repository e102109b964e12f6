"""Hostile data: every broken, strange or malicious file gives a clear DataError naming it, or a counted skip.

Cases already covered in test_bad_input.py (a half PNG and a text file in a folder, --skip-bad-images
counting them, gray mixed with RGB, a class folder without images in train) are not repeated here.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import time
import zlib

import numpy as np
import pytest
from helpers import make_image_folder, random_images, run_cli, save_image
from PIL import Image, ImageFile

from convforge.data import imagefolder as imagefolder_module
from convforge.data import load
from convforge.data.imagefolder import MAX_IMAGE_PIXELS, decode_image, list_image_folder
from convforge.data.paths import printable
from convforge.errors import DataError


def _encodes(text: str) -> bool:
    """True when ``text`` can be printed or logged as UTF-8 (no lone surrogates from undecodable names)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bytes(mode: str, fmt: str, size=(8, 8), array: np.ndarray | None = None) -> bytes:
    img = Image.fromarray(array) if array is not None else Image.new(mode, size, 7)
    if array is not None and mode != img.mode:
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _folder(root, classes=("a", "b")):
    make_image_folder(root, {"train": 2, "test": 1}, classes=classes)
    return root


# ---------------------------------------------------------------- single files


def _jpeg_truncated():
    data = _bytes("RGB", "JPEG", array=random_images(1, (32, 32), seed=1)[0])
    return data[: len(data) * 2 // 3]


def _png_truncated_in_data():
    data = _bytes("RGB", "PNG", array=random_images(1, (32, 32), seed=2)[0])
    return data[: len(data) - 40]  # header and part of the pixel data survive


@pytest.mark.parametrize("name,content,reason", [
    ("cut.jpg", _jpeg_truncated(), "truncated or corrupt"),
    ("cut.png", _png_truncated_in_data(), "truncated or corrupt"),
    ("empty.png", b"", "the file is empty (0 bytes)"),
    ("notes.png", b"these are my notes, not a picture\n", "not an image in a known format"),
    ("noise.jpg", bytes(range(256)) * 4, "not an image in a known format"),
    ("header-only.png", b"\x89PNG\r\n\x1a\n", "not an image in a known format"),
    ("zeroed.bmp", b"BM" + bytes(60), "Unsupported BMP header"),
], ids=lambda value: value if isinstance(value, str) and value.count(".") == 1 else "")
def test_broken_file_is_a_data_error_naming_it(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        decode_image(str(path), None)
    message = str(info.value)
    assert message.startswith(f"cannot read image {path}: ") and reason in message


def test_corrupt_jpeg_pixels_in_folder_are_named_or_skipped(tmp_path):
    root = _folder(tmp_path / "pets")
    bad = root / "test" / "b" / "cut.jpg"
    bad.write_bytes(_jpeg_truncated())
    empty = root / "train" / "a" / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as info:
        load(f"imagefolder:{root}")
    message = str(info.value)
    assert message.startswith("2 image file(s) could not be decoded")
    assert f"{bad} (truncated or corrupt" in message and f"{empty} (the file is empty (0 bytes))" in message
    data = load(f"imagefolder:{root}", skip_bad_images=True)
    assert len(data.train) == 4 and len(data.test) == 2
    assert any(n.startswith("skipped 2 unreadable image(s)") and str(bad) in n for n in data.notes)


@pytest.mark.parametrize("content_fmt,suffix", [("PNG", ".jpg"), ("JPEG", ".png"), ("BMP", ".webp"), ("PNG", ".JPEG")])
def test_wrong_extension_decodes_by_content(tmp_path, content_fmt, suffix):
    root = _folder(tmp_path / "mixed")
    pixels = random_images(1, (8, 8), seed=5)[0]
    (root / "train" / "a" / f"zz{suffix}").write_bytes(_bytes("RGB", content_fmt, array=pixels))
    data = load(f"imagefolder:{root}")
    assert len(data.train) == 5
    if content_fmt != "JPEG":  # lossless: the exact pixels
        assert np.array_equal(data.train.images[2].permute(1, 2, 0).numpy(), pixels)


def test_text_file_named_png_is_an_error_or_a_skip(tmp_path):
    root = _folder(tmp_path / "pets")
    fake = root / "train" / "b" / "readme.png"
    fake.write_text("# not an image\n")
    with pytest.raises(DataError, match=f"{fake} \\(not an image in a known format"):
        load(f"imagefolder:{root}")
    data = load(f"imagefolder:{root}", skip_bad_images=True)
    assert len(data.train) == 4 and any(str(fake) in n for n in data.notes)


# ---------------------------------------------------------------- decompression bombs


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (2**31 - 1, 1), (9000, 9000), (8193, 8193)])
def test_huge_dimensions_refused_from_the_header(tmp_path, monkeypatch, width, height):
    """A tiny file claiming a huge image is refused before any pixel memory is allocated."""
    loads = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(width, height))
    assert path.stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        decode_image(str(path), (8, 8))
    assert time.perf_counter() - start < 1.0
    assert loads == []  # never decoded
    message = str(info.value)
    assert str(path) in message and "decompression-bomb" in message
    if width * height < 2 * 89_478_485:  # below PIL's own hard limit: convforge's check names the size
        assert f"{width}x{height} pixels" in message and f"{MAX_IMAGE_PIXELS:,}" in message


def test_bomb_in_folder_is_skipped_and_never_sets_the_size(tmp_path):
    root = _folder(tmp_path / "pets")
    bomb = root / "train" / "a" / "bomb.png"
    bomb.write_bytes(bomb_png(9000, 9000))
    assert imagefolder_module._probe_size(str(bomb)) is None  # not a candidate for the common size
    with pytest.raises(DataError, match="decompression-bomb"):
        load(f"imagefolder:{root}")
    data = load(f"imagefolder:{root}", skip_bad_images=True)
    assert data.image_size == (8, 8) and len(data.train) == 4
    assert any("skipped 1 unreadable image(s)" in n and str(bomb) in n for n in data.notes)


# ---------------------------------------------------------------- channels and modes


def _save_mode(path, mode, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix == ".jpg" else "PNG"
    if mode == "I;16":
        Image.fromarray(array[..., 0].astype(np.uint16) * 257).save(path, fmt)  # 16-bit gray, 0..65535
    elif mode == "CMYK":
        Image.fromarray(array, "RGB").convert("CMYK").save(path, fmt, quality=100)
    elif mode == "P":
        Image.fromarray(array, "RGB").quantize(16).save(path, fmt)
    elif mode == "RGBA":
        rgba = np.dstack([array, np.full(array.shape[:2], 90, np.uint8)])
        Image.fromarray(rgba, "RGBA").save(path, fmt)
    elif mode == "LA":
        Image.fromarray(np.dstack([array[..., 0], array[..., 1]]), "LA").save(path, fmt)
    else:
        Image.fromarray(array, "RGB").convert(mode).save(path, fmt)


def test_every_channel_layout_becomes_rgb_consistently(tmp_path):
    root = tmp_path / "modes"
    pixels = random_images(6, (8, 8), seed=11)
    modes = ["RGBA", "P", "I;16", "CMYK", "LA", "1"]
    for i, mode in enumerate(modes):
        suffix = ".jpg" if mode == "CMYK" else ".png"
        _save_mode(root / "train" / ("a" if i % 2 else "b") / f"{i}{suffix}", mode, pixels[i])
    save_image(root / "test" / "a" / "rgb.png", pixels[0])
    save_image(root / "test" / "b" / "gray.png", pixels[1][..., 0])
    data = load(f"imagefolder:{root}")
    assert data.channels == 3 and data.train.images.shape == (6, 3, 8, 8)
    # I;16, LA and 1 are grayscale (one channel each, repeated); so is the gray test image
    assert any("converted 4 grayscale image(s) to RGB" in n for n in data.notes)
    by_name = {}
    order = sorted(range(6), key=lambda i: ("a" if i % 2 else "b", str(i)))  # class a first, then by name
    for row, i in enumerate(order):
        by_name[modes[i]] = data.train.images[row].permute(1, 2, 0).numpy()
    # composited on white, as image stores do: alpha 90 of 255 keeps 90/255 of the colour
    on_white = (pixels[0].astype(int) * 90 + 255 * (255 - 90) + 127) // 255
    assert np.abs(by_name["RGBA"].astype(int) - on_white).max() <= 1
    gray16 = by_name["I;16"]
    assert np.array_equal(gray16[..., 0], pixels[2][..., 0]) and np.array_equal(gray16[..., 0], gray16[..., 2])
    la, (gray, alpha) = by_name["LA"].astype(int), (pixels[4][..., 0].astype(int), pixels[4][..., 1].astype(int))
    assert np.abs(la[..., 0] - (gray * alpha + 255 * (255 - alpha) + 127) // 255).max() <= 1
    assert set(np.unique(by_name["1"])) <= {0, 255}
    cmyk = by_name["CMYK"].astype(int)
    assert np.abs(cmyk - pixels[3].astype(int)).mean() < 20  # JPEG, so close rather than equal


def test_sixteen_bit_gray_folder_stays_one_channel(tmp_path):
    root = tmp_path / "gray16"
    pixels = random_images(3, (8, 8), seed=3)
    for i, split in enumerate(("train", "train", "test")):
        _save_mode(root / split / "a" / f"{i}.png", "I;16", pixels[i])
    data = load(f"imagefolder:{root}")
    assert data.channels == 1
    assert np.array_equal(data.train.images[0, 0].numpy(), pixels[0][..., 0])


# ---------------------------------------------------------------- file names that are not UTF-8


def _non_utf8(path, raw: bytes) -> bytes:
    return os.fsencode(path) + b"/" + raw


def test_non_utf8_file_names_load_and_cache(tmp_path, cache_dir):
    root = _folder(tmp_path / "names")
    shutil.copy(root / "train" / "a" / "img000.png", _non_utf8(root / "train" / "a", b"\xff\xfe.png"))
    first = load(f"imagefolder:{root}")
    assert len(first.train) == 5
    entries = list((cache_dir / "imagefolder").iterdir())
    again = load(f"imagefolder:{root}")  # the fingerprint of the listing (with the odd name) is stable
    assert list((cache_dir / "imagefolder").iterdir()) == entries
    assert np.array_equal(again.train.images.numpy(), first.train.images.numpy())


def test_non_utf8_bad_file_name_is_printable(tmp_path):
    root = _folder(tmp_path / "names")
    bad = _non_utf8(root / "train" / "b", b"caf\xe9-\xff.png")
    with open(bad, "wb") as handle:
        handle.write(b"junk")
    with pytest.raises(DataError) as info:
        load(f"imagefolder:{root}")
    message = str(info.value)
    assert _encodes(message) and "caf\\xe9-\\xff.png (not an image in a known format" in message
    data = load(f"imagefolder:{root}", skip_bad_images=True)
    assert all(_encodes(n) for n in data.notes)
    assert any("skipped 1 unreadable image(s)" in n and "caf\\xe9-\\xff.png" in n for n in data.notes)
    with pytest.raises(DataError) as info:
        decode_image(os.fsdecode(bad), None)
    assert _encodes(str(info.value)) and "caf\\xe9-\\xff.png" in str(info.value)


def test_non_utf8_class_folder_gets_a_printable_class_name(tmp_path):
    root = _folder(tmp_path / "names")
    for split in ("train", "test"):
        os.rename(root / split / "b", _non_utf8(root / split, b"\xe9t\xe9"))
    data = load(f"imagefolder:{root}")
    assert data.classes == ["a", "\\xe9t\\xe9"] and all(_encodes(c) for c in data.classes)
    # and a cached load gives the same names
    assert load(f"imagefolder:{root}").classes == data.classes


def test_non_utf8_empty_class_folder_error_is_printable(tmp_path):
    root = _folder(tmp_path / "names")
    os.mkdir(_non_utf8(root / "train", b"\xe9mpty"))
    with pytest.raises(DataError) as info:
        load(f"imagefolder:{root}")
    assert _encodes(str(info.value)) and "\\xe9mpty holds no images" in str(info.value)


def test_printable_keeps_ordinary_text():
    assert printable("/data/ünïcode/猫.png") == "/data/ünïcode/猫.png"
    assert printable(os.fsdecode(b"/d/\xff.png")) == "/d/\\xff.png"
    assert printable(b"/d/\xff.png") == "/d/\\xff.png"
    assert printable("lone \ud800 surrogate") == "lone \\ud800 surrogate"


@pytest.mark.slow
def test_non_utf8_names_through_the_cli(tmp_path):
    """The real command prints notes, classes and progress about such names without a UnicodeEncodeError."""
    root = _folder(tmp_path / "names")
    os.rename(root / "train" / "b", _non_utf8(root / "train", b"\xe9t\xe9"))
    os.rename(root / "test" / "b", _non_utf8(root / "test", b"\xe9t\xe9"))
    with open(_non_utf8(root / "train" / "a", b"bad\xff.png"), "wb") as handle:
        handle.write(b"junk")
    args = ["train", "--data", f"imagefolder:{root}", "--epochs", "1", "--batch-size", "2",
            "--model-arg", "widths=[4, 8]", "--out", tmp_path / "run"]
    result = run_cli(*args, cwd=tmp_path, env={"PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad\\xff.png" in result.stderr and "--skip-bad-images" in result.stderr
    result = run_cli(*args, "--skip-bad-images", cwd=tmp_path, env={"PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "skipped 1 unreadable image(s)" in result.stderr


# ---------------------------------------------------------------- symlinks


def test_symlink_loop_inside_a_class_folder_is_ignored(tmp_path):
    root = _folder(tmp_path / "links")
    os.symlink(root / "train" / "a", root / "train" / "a" / "loop")  # a -> a: no recursion into it
    os.symlink(root, root / "train" / "b" / "up")
    data = load(f"imagefolder:{root}")
    assert len(data.train) == 4
    assert any("ignored 2 entries" in n for n in data.notes)


def test_class_folder_linking_to_its_parent_is_an_error(tmp_path):
    root = _folder(tmp_path / "links")
    loop = root / "train" / "loop"
    os.symlink(root / "train", loop)
    with pytest.raises(DataError) as info:
        list_image_folder(root)
    message = str(info.value)
    assert f"class folder {loop} is a symbolic link to {root / 'train'}" in message and "symlink loop" in message


def test_class_folder_that_is_a_symlink_to_itself_is_an_error(tmp_path):
    root = _folder(tmp_path / "links")
    os.symlink("self", root / "test" / "self")
    with pytest.raises(DataError, match=f"class folder {root / 'test' / 'self'} is a symbolic link loop"):
        load(f"imagefolder:{root}")


def test_class_folder_that_is_a_broken_symlink_is_an_error(tmp_path):
    root = _folder(tmp_path / "links")
    link = root / "train" / "c"
    os.symlink(tmp_path / "unmounted" / "c", link)
    with pytest.raises(DataError) as info:
        load(f"imagefolder:{root}")
    assert f"class folder {link} is a broken symbolic link (-> {tmp_path / 'unmounted' / 'c'})" in str(info.value)
    assert "fix or remove it" in str(info.value)


def test_symlinked_class_folder_elsewhere_works(tmp_path):
    root = _folder(tmp_path / "links")
    shutil.move(root / "train" / "b", tmp_path / "b-images")
    os.symlink(tmp_path / "b-images", root / "train" / "b")
    assert len(load(f"imagefolder:{root}").train) == 4


@pytest.mark.parametrize("target", ["self.png", "missing.png"])
def test_image_named_symlink_that_is_broken_or_a_loop(tmp_path, target):
    root = _folder(tmp_path / "links")
    link = root / "train" / "a" / "self.png"
    os.symlink(target, link)
    reason = "a symbolic link loop" if target == "self.png" else "a broken symbolic link"
    with pytest.raises(DataError) as info:
        load(f"imagefolder:{root}")
    assert f"{link} ({reason} (-> {target}))" in str(info.value)
    data = load(f"imagefolder:{root}", skip_bad_images=True)
    assert len(data.train) == 4 and any("skipped 1 unreadable image(s)" in n for n in data.notes)


# ---------------------------------------------------------------- empty class folders


def test_empty_class_folder_in_test_only_is_named(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "test" / "c").mkdir()
    with pytest.raises(DataError, match=f"class folder {root / 'test' / 'c'} holds no images"):
        load(f"imagefolder:{root}")


def test_empty_class_folder_in_val_when_train_has_the_class_is_a_note(tmp_path):
    root = tmp_path / "pets"
    make_image_folder(root, {"train": 2, "val": 1, "test": 1}, classes=("a", "b"))
    for image in (root / "val" / "b").iterdir():
        image.unlink()
    data = load(f"imagefolder:{root}")
    assert len(data.val) == 1 and len(data.train) == 4
    assert f"class folder {root / 'val' / 'b'} holds no images (the class has images in train, test)" in data.notes


def test_empty_class_folder_in_train_is_an_error_even_with_test_images(tmp_path):
    root = _folder(tmp_path / "pets")
    for image in (root / "train" / "b").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=f"class folder {root / 'train' / 'b'} holds no images"):
        load(f"imagefolder:{root}")


def test_class_whose_every_training_image_is_skipped(tmp_path):
    root = _folder(tmp_path / "pets")
    for image in (root / "train" / "b").iterdir():
        image.write_bytes(b"x")
    with pytest.raises(DataError) as info:
        load(f"imagefolder:{root}", skip_bad_images=True)
    assert f"class folder(s) with no usable image in {root / 'train'}: b" in str(info.value)


def test_unlistable_class_folder(tmp_path, monkeypatch):
    root = _folder(tmp_path / "pets")
    real = os.scandir

    def deny(path="."):
        if str(path).endswith(os.path.join("train", "b")):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(imagefolder_module.os, "scandir", deny)
    with pytest.raises(DataError, match=f"cannot list {root / 'train' / 'b'}: Permission denied"):
        load(f"imagefolder:{root}")


# ---------------------------------------------------------------- specs with awkward paths


@pytest.mark.parametrize("arg,match", [
    ("~no_such_user_xyz/data", "cannot expand '~'"),
    ("x" * 5000, "File name too long"),
    ("a\0b", "NUL character"),
])
def test_awkward_directory_arguments(arg, match):
    with pytest.raises(DataError, match=match):
        load(f"imagefolder:{arg}")


@pytest.mark.parametrize("spec,match", [
    ("synthetic:classes=0", "classes must be in 1..10000"),
    ("synthetic:size=-3", "size must be in 1..4096"),
    ("synthetic:seed=18446744073709551616", "seed must be in"),
    ("synthetic:train=10000000,size=64", "over the limit"),
])
def test_synthetic_options_out_of_range(spec, match):
    with pytest.raises(DataError, match=match):
        load(spec)


@pytest.mark.parametrize("size", [0, -1, (8,), (8, 0), "8", 10**6])
def test_bad_image_size(tmp_path, size):
    with pytest.raises(DataError, match="image size must be an integer"):
        load(f"imagefolder:{_folder(tmp_path / 'pets')}", image_size=size)


# ---------------------------------------------------------------- EXIF orientation, as image stores decode


def _rotated_jpeg(path, array, orientation):
    """``array`` saved as a JPEG whose EXIF says to show it turned (orientation 6: 90 degrees clockwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif, quality=95)
    return path


def test_exif_rotated_photos_are_decoded_upright_like_image_stores(tmp_path):
    from convforge.data.photos import decode_photo

    root = tmp_path / "phones"
    landscape = np.zeros((24, 40, 3), np.uint8)
    landscape[:, :20] = (250, 20, 20)  # left half red, right half blue as stored
    landscape[:, 20:] = (20, 20, 250)
    rotated = _rotated_jpeg(root / "train" / "a" / "0.jpg", landscape, 6)
    save_image(root / "train" / "a" / "1.jpg", np.full((40, 24, 3), 128, np.uint8))  # portrait, no EXIF
    save_image(root / "test" / "a" / "2.jpg", np.full((40, 24, 3), 128, np.uint8))
    upright = decode_image(str(rotated), None)
    assert upright.shape == (40, 24, 3)  # shown as portrait
    assert upright[2, 12, 0] > 200 and upright[-3, 12, 2] > 200  # turned clockwise: stored left (red) on top
    assert np.array_equal(upright, decode_photo(rotated, 3).permute(1, 2, 0).numpy())  # the store's pixels
    data = load(f"imagefolder:{root}")  # the upright sizes agree: no resizing, no "differ in size" error
    assert data.train.images.shape == (2, 3, 40, 24)
    assert not any("differ in size" in note for note in data.notes)
    assert np.array_equal(data.train.images[0].permute(1, 2, 0).numpy(), upright)
