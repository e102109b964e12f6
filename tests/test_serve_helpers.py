"""What the serve tests share: tiny checkpoints, images, an in-process server on a free port, hostile files."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from helpers import random_images, save_image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

CLASSES = [f"class-{i}" for i in range(10)]


def tiny_checkpoint(path: Path, *, image_size: int = 16, extra_meta: dict | None = None, seed: int = 0) -> Path:
    """A randomly initialised 10-class small CNN on 3 x ``image_size`` x ``image_size`` inputs, saved as a
    convforge checkpoint with its normalisation (and ``extra_meta`` added to its metadata)."""
    from convforge.train.checkpoint import save_checkpoint
    from convforge.train.inference import load_model

    loaded = load_model("smallcnn", num_classes=10, classes=CLASSES, in_chans=3, image_size=image_size,
                        mean=[0.45, 0.5, 0.55], std=[0.25, 0.2, 0.3], model_args={"widths": [8, 16, 32]}, seed=seed)
    meta = {**loaded.meta, "metrics": {"test_top1": 12.5}, **(extra_meta or {})}
    return save_checkpoint(path, loaded.model, meta)


def image_files(folder: Path, count: int = 4, seed: int = 0) -> list[Path]:
    """``count`` random images of different sizes and kinds: RGB PNG, RGB JPEG, grayscale PNG, ..."""
    paths = []
    for i in range(count):
        size = (17 + 3 * i, 23 - i)
        if i % 3 == 2:
            array = random_images(1, size, channels=1, seed=seed + i)[0]
        else:
            array = random_images(1, size, seed=seed + i)[0]
        paths.append(save_image(folder / f"image{i}{'.jpg' if i % 3 == 1 else '.png'}", array))
    return paths


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels: a few kilobytes that claim any size
    (a decompression bomb), written row by row so that the test never holds the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@contextmanager
def running(served: Any, **options: Any) -> Iterator[tuple[str, Any]]:
    """``served`` behind uvicorn in a thread on a free localhost port: yields (base URL, the app's ServerState)."""
    import uvicorn

    from convforge.serve import Limits, ServeOptions, create_app
    from convforge.serve.server import address, bind

    limits = options.pop("limits", None) or Limits()
    app = create_app(served, ServeOptions(**options, limits=limits))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield address(sock), app.state.serve
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny checkpoint, its LoadedModel, the torch Served of it and a few image files."""
    from convforge.serve import load_served
    from convforge.train.inference import load_model

    folder = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(folder / "tiny.safetensors")
    loaded = load_model(ckpt)
    return {"ckpt": ckpt, "loaded": loaded, "served": load_served(None, "torch", loaded=loaded),
            "images": image_files(folder), "folder": folder}


def offline_top(loaded: Any, images: list[Any], top_k: int = 5) -> list[list[dict]]:
    """What ``convforge predict`` answers for ``images`` (files or uint8 tensors): each image's top-k list."""
    from convforge.train.inference import predict

    return [item["top"] for item in predict(loaded, images, top_k=top_k)]


def assert_same_top(got: list[dict], expected: list[dict], atol: float = 1e-6) -> None:
    """The same classes in the same order, with the same probabilities (to ``atol``)."""
    assert [t["class"] for t in got] == [t["class"] for t in expected]
    assert [t["index"] for t in got] == [t["index"] for t in expected]
    assert np.allclose([t["probability"] for t in got], [t["probability"] for t in expected], atol=atol, rtol=0)


def in_background(function, count: int) -> tuple[list[threading.Thread], list]:
    """``function(i)`` for i < ``count``, each in a started thread; the threads and the list their results fill."""
    results: list = [None] * count

    def work(i: int) -> None:
        results[i] = function(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def wait_for(condition, seconds: float = 30.0) -> None:
    """Poll ``condition()`` until it is true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
