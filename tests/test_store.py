"""The variable-size image store: layout, reuse, resuming a killed build, and odd image files."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from convforge.data import store as store_module
from convforge.data import store_build
from convforge.data.store import ImageStore, build_store, open_store
from convforge.errors import DataError
from helpers import REPO, random_images, save_image

CLASSES = ["a", "b"]


def make_files(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[tuple[str, int]]:
    """One random RGB PNG per (height, width), labels alternating 0, 1."""
    files = []
    for i, size in enumerate(sizes):
        path = save_image(root / f"img{i:04d}.png", random_images(1, size, seed=seed + i)[0])
        files.append((str(path), i % 2))
    return files


def store_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}


def test_images_keep_their_aspect_ratio_and_are_never_enlarged(tmp_path):
    files = make_files(tmp_path / "img", [(20, 40), (10, 12), (64, 48), (16, 16)])
    store = build_store(files, CLASSES, tmp_path / "store", store_size=16, workers=1, log=lambda _: None)
    assert isinstance(store, ImageStore) and len(store) == 4 and store.channels == 3
    assert store.classes == CLASSES and store.path == tmp_path / "store"
    assert store.sizes.dtype == torch.int64 and store.sizes.tolist() == [[16, 32], [10, 12], [21, 16], [16, 16]]
    assert store.labels.dtype == torch.int64 and store.labels.tolist() == [0, 1, 0, 1]
    for i in range(4):
        image = store.image(i)
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *store.sizes[i].tolist())
    small = np.asarray(Image.open(files[1][0])).transpose(2, 0, 1)
    assert np.array_equal(store.image(1).numpy(), small)  # not resized: exactly the file's pixels
    assert store.image(1).data_ptr() - store.image(0).data_ptr() == 3 * 16 * 32  # views of one buffer


def test_open_store_and_pickle_map_the_same_file(tmp_path):
    files = make_files(tmp_path / "img", [(12, 9), (7, 30)])
    built = build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, log=lambda _: None)
    for other in (open_store(tmp_path / "store"), pickle.loads(pickle.dumps(built))):
        assert len(other) == 2 and other.sizes.tolist() == built.sizes.tolist()
        assert all(torch.equal(other.image(i), built.image(i)) for i in range(2))
    assert len(pickle.dumps(built)) < 1000  # pickled as its path, not its pixels
    with pytest.raises(IndexError, match="out of range"):
        built.image(2)


def test_a_second_build_reuses_the_store_and_a_changed_file_rebuilds_it(tmp_path):
    files = make_files(tmp_path / "img", [(10, 10), (12, 8)])
    out = tmp_path / "store"
    messages: list[str] = []
    build_store(files, CLASSES, out, store_size=8, workers=1, log=messages.append)
    assert any("decoding 2 images" in m for m in messages)
    messages.clear()
    build_store(files, CLASSES, out, store_size=8, workers=1, log=messages.append)
    assert messages == []
    save_image(Path(files[0][0]), np.zeros((30, 10, 3), np.uint8))
    store = build_store(files, CLASSES, out, store_size=8, workers=1, log=messages.append)
    assert any("decoding 2 images" in m for m in messages)
    assert store.sizes[0].tolist() == [24, 8] and int(store.image(0).max()) == 0
    assert sorted(os.listdir(tmp_path)) == [".store.lock", "img", "store"]


def test_the_parent_receives_no_pixels(tmp_path, monkeypatch):
    files = make_files(tmp_path / "img", [(56 + i % 7, 52 + i % 5) for i in range(300)])
    results: list = []
    original = store_module.map_in_processes

    def spy(fn, jobs, workers, label):
        for result in original(fn, jobs, workers, label):
            results.append(result)
            yield result

    monkeypatch.setattr(store_module, "map_in_processes", spy)
    monkeypatch.setattr(store_module, "CHUNK_IMAGES", 32)
    tracemalloc.start()
    try:
        store = build_store(files, CLASSES, tmp_path / "store", store_size=48, workers=2, log=lambda _: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(store) == 300 and len(results) == 1 + 10  # one header job, ten decoding chunks
    pixel_bytes = int((3 * store.sizes[:, 0] * store.sizes[:, 1]).sum())
    assert pixel_bytes > 2_000_000 and peak < pixel_bytes / 4  # this process held no image's pixels

    def plain(value) -> bool:
        if isinstance(value, (tuple, list)):
            return all(map(plain, value))
        return isinstance(value, (int, str, bool, np.integer, np.bool_))

    assert all(plain(result) for result in results)
    assert all(len(pickle.dumps(result)) < 64 * 1024 for result in results)


def test_a_build_killed_midway_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    files = make_files(tmp_path / "img", [(10 + i % 5, 14 - i % 3) for i in range(22)])
    monkeypatch.setattr(store_module, "CHUNK_IMAGES", 4)  # 6 chunks
    fresh = tmp_path / "fresh"
    build_store(files, CLASSES, fresh, store_size=8, workers=1, log=lambda _: None)
    original = store_module._store_chunk
    calls: list[int] = []

    def dies_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job.chunk)
        return original(job)

    out = tmp_path / "store"
    monkeypatch.setattr(store_module, "_store_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_store(files, CLASSES, out, store_size=8, workers=1, log=lambda _: None)
    assert not out.exists() and (tmp_path / ".store.partial").is_dir()
    with pytest.raises(DataError, match="not a built image store"):
        open_store(out)

    def counted(job):
        calls.append(job.chunk)
        return original(job)

    monkeypatch.setattr(store_module, "_store_chunk", counted)
    messages: list[str] = []
    build_store(files, CLASSES, out, store_size=8, workers=1, log=messages.append)
    assert calls == [0, 1, 2, 3, 4, 5] and any("2 of 6 chunks done" in m for m in messages)
    assert store_bytes(out) == store_bytes(fresh)
    assert not (tmp_path / ".store.partial").exists()


def test_a_changed_file_restarts_an_unfinished_build(tmp_path, monkeypatch):
    files = make_files(tmp_path / "img", [(10, 10)] * 9)
    monkeypatch.setattr(store_module, "CHUNK_IMAGES", 3)
    original = store_module._store_chunk

    def dies_in_the_second(job):
        if job.chunk == 1:
            raise KeyboardInterrupt
        return original(job)

    monkeypatch.setattr(store_module, "_store_chunk", dies_in_the_second)
    with pytest.raises(KeyboardInterrupt):
        build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, log=lambda _: None)
    monkeypatch.setattr(store_module, "_store_chunk", original)
    save_image(Path(files[0][0]), np.full((10, 10, 3), 7, np.uint8))
    messages: list[str] = []
    store = build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, log=messages.append)
    assert not any("resuming" in m for m in messages) and int(store.image(0).max()) == 7
    build_store(files, CLASSES, tmp_path / "fresh", store_size=8, workers=1, log=lambda _: None)
    assert store_bytes(tmp_path / "store") == store_bytes(tmp_path / "fresh")


def test_a_process_killed_by_sigkill_resumes_to_the_same_bytes(tmp_path):
    files = make_files(tmp_path / "img", [(9, 11)] * 12)
    script = textwrap.dedent(f"""
        import sys
        from convforge.data import store
        store.CHUNK_IMAGES = 4
        store.build_store({files!r}, {CLASSES!r}, sys.argv[1], store_size=8, workers=1)
    """)
    env = {**os.environ, "CONVFORGE_FAULTS": "store:chunk@2:kill"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    progress = (tmp_path / ".store.partial" / "progress.jsonl").read_text().splitlines()
    assert len(progress) == 2 and not (tmp_path / "store").exists()
    env.pop("CONVFORGE_FAULTS")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "resuming" in done.stdout and "2 of 3 chunks done" in done.stdout, done.stderr
    build_store(files, CLASSES, tmp_path / "fresh", store_size=8, workers=1, log=lambda _: None)  # 1 chunk
    assert store_bytes(tmp_path / "store") == store_bytes(tmp_path / "fresh")


def test_an_all_gray_set_has_one_channel_and_gray_in_a_colour_set_gets_three(tmp_path):
    gray = [(str(save_image(tmp_path / f"g{i}.png", random_images(1, (6, 5), channels=1, seed=i)[0])), 0)
            for i in range(2)]
    store = build_store(gray, CLASSES, tmp_path / "gray", store_size=8, workers=1, log=lambda _: None)
    assert store.channels == 1 and tuple(store.image(0).shape) == (1, 6, 5)
    mixed = gray + make_files(tmp_path / "rgb", [(6, 5)])
    store = build_store(mixed, CLASSES, tmp_path / "mixed", store_size=8, workers=1, log=lambda _: None)
    pixels = np.asarray(Image.open(gray[0][0]))
    assert store.channels == 3 and all(np.array_equal(store.image(0)[c].numpy(), pixels) for c in range(3))


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=100, **options)
    return buffer.getvalue()


def test_cmyk_and_ycck_jpegs_become_rgb(tmp_path):
    colour = np.array([200, 40, 90], np.uint8)
    cmyk = tmp_path / "cmyk.jpg"
    cmyk.write_bytes(jpeg_bytes(Image.fromarray(np.tile(colour, (16, 16, 1))).convert("CMYK")))
    # YCCK: Pillow writes no YCCK, so store the YCbCr of Pillow's C, M, Y (and K = 0) in a CMYK JPEG and
    # set its Adobe marker's colour transform to 2 (YCCK); Pillow writes CMYK inverted (Adobe style).
    ycc = np.asarray(Image.fromarray(np.tile(255 - colour, (16, 16, 1))).convert("YCbCr"))
    stored = np.concatenate([ycc, np.full((16, 16, 1), 255, np.uint8)], axis=2)
    data = bytearray(jpeg_bytes(Image.fromarray(255 - stored, "CMYK")))
    data[data.find(b"Adobe") + 11] = 2
    ycck = tmp_path / "ycck.jpg"
    ycck.write_bytes(bytes(data))
    assert Image.open(ycck).info["adobe_transform"] == 2
    store = build_store([(str(cmyk), 0), (str(ycck), 1)], CLASSES, tmp_path / "store", store_size=16,
                        workers=1, log=lambda _: None)
    assert store.channels == 3
    for i in range(2):
        pixel = store.image(i)[:, 8, 8].numpy().astype(int)
        assert np.abs(pixel - colour).max() <= 3, (i, pixel)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    store = build_store([(str(path), 0)], CLASSES, tmp_path / "store", store_size=8, workers=1, log=lambda _: None)
    assert store.channels == 1 and store.image(0)[0, 0].tolist() == [0, 1, 128, 255]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    la = np.stack([np.full((4, 4), 50, np.uint8), np.full((4, 4), 128, np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "palette.png", transparency=1)  # colour 1 (green) is transparent
    files = [(str(tmp_path / name), 0) for name in ("rgba.png", "la.png", "palette.png")]
    store = build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, log=lambda _: None)
    assert store.channels == 3
    assert store.image(0)[:, 0, 0].tolist() == [200, 0, 0] and store.image(0)[:, 3, 0].tolist() == [255, 255, 255]
    assert set(store.image(1).flatten().tolist()) == {round(50 * 128 / 255 + 255 * 127 / 255)}
    assert store.image(2)[:, 0, 0].tolist() == [0, 0, 255] and store.image(2)[:, 1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_exif_orientation_6_is_stored_upright(tmp_path, fmt):
    array = np.zeros((32, 48, 3), np.uint8)
    array[:16, :16] = 255  # a white block at the top left of the stored (sideways) picture
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated.{fmt}"
    Image.fromarray(array).save(path, exif=exif.tobytes(), **({"quality": 100} if fmt == "jpg" else {}))
    store = build_store([(str(path), 0)], CLASSES, tmp_path / "store", store_size=64, workers=1, log=lambda _: None)
    assert store.sizes.tolist() == [[48, 32]]
    upright = np.rot90(array, -1)  # orientation 6: turn a quarter clockwise to show it
    assert np.abs(store.image(0).numpy().transpose(1, 2, 0).astype(int) - upright).max() <= 8


def test_large_jpegs_are_decoded_in_draft_mode(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(Image.fromarray(np.full((400, 640, 3), 90, np.uint8))))
    drafts: list = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    store = build_store([(str(path), 0)], CLASSES, tmp_path / "store", store_size=48, workers=1, log=lambda _: None)
    assert store.sizes.tolist() == [[48, 77]]
    assert drafts == [((77, 48), (80, 50))]  # decoded at 1/8 scale, the smallest still >= 77x48
    assert np.abs(store.image(0).numpy().astype(int) - 90).max() <= 2


def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_IMAGE_PIXELS", 30 * 30)
    files = make_files(tmp_path / "img", [(20, 20), (40, 30)])
    with pytest.raises(DataError, match=r"img0001\.png \(its header claims 30x40 pixels, over the 900-pixel"):
        build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, log=lambda _: None)
    store = build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, skip_bad_images=True,
                        log=lambda _: None)
    assert len(store) == 1 and store.skipped[0][0] == files[1][0]


def test_a_truncated_file_is_named_or_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_IMAGES", 2)
    files = make_files(tmp_path / "img", [(30, 30)] * 5)
    data = Path(files[2][0]).read_bytes()
    Path(files[2][0]).write_bytes(data[: len(data) // 2])  # header intact, pixels cut short
    out = tmp_path / "store"
    with pytest.raises(DataError, match=r"1 image file\(s\) could not be decoded: .*img0002\.png \(.*--skip-bad-images"):
        build_store(files, CLASSES, out, store_size=8, workers=1, log=lambda _: None)
    assert not out.exists()
    store = build_store(files, CLASSES, out, store_size=8, workers=1, skip_bad_images=True, log=lambda _: None)
    assert len(store) == 4 and store.labels.tolist() == [0, 1, 1, 0]
    assert [path for path, _ in store.skipped] == [files[2][0]]
    with pytest.raises(DataError, match="img0002"):  # the same store, asked for without skipping
        build_store(files, CLASSES, out, store_size=8, workers=1, log=lambda _: None)


def test_bad_arguments_and_damaged_stores_are_explained(tmp_path):
    files = make_files(tmp_path / "img", [(10, 10)])
    with pytest.raises(DataError, match="store_size must be a positive"):
        build_store(files, CLASSES, tmp_path / "store", store_size=0)
    with pytest.raises(DataError, match="class index 5, but there are 2 classes"):
        build_store([(files[0][0], 5)], CLASSES, tmp_path / "store", store_size=8)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not an image store and is not empty"):
        build_store(files, CLASSES, tmp_path / "mine", store_size=8, workers=1, log=lambda _: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, log=lambda _: None)
    with open(tmp_path / "store" / "images.u8", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(DataError, match=r"store .*store is damaged: images.u8 holds 10 bytes, expected 192"):
        open_store(tmp_path / "store")


def test_unreadable_headers_are_reported_before_any_decoding(tmp_path, monkeypatch):
    files = make_files(tmp_path / "img", [(10, 10)] * 3)
    (tmp_path / "img" / "junk.png").write_bytes(b"not a picture")
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    files += [(str(tmp_path / "img" / "junk.png"), 1), (str(tmp_path / "img" / "empty.png"), 0)]
    decoded: list[int] = []
    original = store_module._store_chunk
    monkeypatch.setattr(store_module, "_store_chunk", lambda job: decoded.append(job.chunk) or original(job))
    with pytest.raises(DataError, match=r"2 image file\(s\) could not be decoded: .*junk\.png \(not an image in a "
                                        r"known format.*empty\.png \(the file is empty"):
        build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, log=lambda _: None)
    assert decoded == []
    store = build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, skip_bad_images=True,
                        log=lambda _: None)
    assert len(store) == 3 and len(store.skipped) == 2 and decoded == [0]


def test_two_builds_of_one_store_at_once_decode_it_once(tmp_path):
    files = make_files(tmp_path / "img", [(12, 12)] * 8)
    messages: list[str] = []
    stores: list[ImageStore] = []

    def build() -> None:
        stores.append(build_store(files, CLASSES, tmp_path / "store", store_size=8, workers=1, log=messages.append))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(stores) == 2 and all(len(store) == 8 for store in stores)
    assert sum("decoding 8 images" in m for m in messages) == 1


RANK_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    from convforge.data import store, store_build
    store.CHUNK_IMAGES = 4
    store_build.POLL_S, store_build.REPORT_S = 0.05, 0.2
    files, out = eval(sys.argv[1]), sys.argv[2]
    built = store.build_store(files, ["a", "b"], out, store_size=8, workers=1)
    pixels = b"".join(built.image(i).numpy().tobytes() for i in range(len(built)))
    print("STORE", len(built), hashlib.sha256(pixels).hexdigest())
""")


def run_rank(local_rank: int, files, out: Path, faults: str = "") -> subprocess.Popen:
    env = {**os.environ, "LOCAL_RANK": str(local_rank), "CONVFORGE_FAULTS": faults}
    return subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, repr(files), str(out)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_under_torchrun_local_rank_0_builds_and_the_other_rank_waits(tmp_path):
    files = make_files(tmp_path / "img", [(12, 10)] * 12)
    waiter = run_rank(1, files, tmp_path / "store")  # started first: it must wait, not build
    deadline = time.monotonic() + 60
    while not (tmp_path / ".store.lock").exists() and time.monotonic() < deadline:  # the waiter is looking
        time.sleep(0.05)
    builder = run_rank(0, files, tmp_path / "store")
    (built, built_err), (waited, waited_err) = builder.communicate(timeout=60), waiter.communicate(timeout=60)
    assert builder.returncode == 0 and waiter.returncode == 0, built_err + waited_err
    assert "decoding 12 images" in built and "decoding" not in waited and "waiting for local rank 0" in waited
    store_lines = [line for line in (built + waited).splitlines() if line.startswith("STORE")]
    assert len(store_lines) == 2 and store_lines[0] == store_lines[1] and store_lines[0].startswith("STORE 12 ")


def test_a_waiting_rank_stops_with_a_clear_error_when_the_builder_dies_or_fails(tmp_path, monkeypatch):
    files = make_files(tmp_path / "img", [(12, 10)] * 12)
    builder = run_rank(0, files, tmp_path / "store", faults="store:chunk@1:kill")
    builder.communicate(timeout=60)
    assert builder.returncode == -9
    waiter = run_rank(1, files, tmp_path / "store")
    _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 1 and "ended before finishing it" in err and str(builder.pid) in err
    bad = files + [(str(tmp_path / "img" / "missing.png"), 0)]
    with pytest.raises(DataError, match="could not be decoded"):
        build_store(bad, CLASSES, tmp_path / "other", store_size=8, workers=1, log=lambda _: None, local_rank=0)
    with pytest.raises(DataError, match="failed: .*could not be decoded"):
        build_store(bad, CLASSES, tmp_path / "other", store_size=8, workers=1, log=lambda _: None, local_rank=1)
    monkeypatch.setattr(store_build, "START_GRACE_S", 0.3)
    monkeypatch.setattr(store_build, "POLL_S", 0.05)
    with pytest.raises(DataError, match="no process is building it"):
        build_store(files, CLASSES, tmp_path / "never", store_size=8, workers=1, log=lambda _: None, local_rank=1)
