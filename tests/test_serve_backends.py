"""convforge serve's backends and outputs: ONNX Runtime fp32 and int8 against the offline prediction, segmentation
masks and super-resolved images as PNG, Grad-CAM overlays, and the Python client."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from test_serve_helpers import (
    assert_same_top,
    offline_top,
    running,
    tiny,  # noqa: F401 - a fixture
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _post(client: httpx.Client, url: str, path, endpoint: str = "predict", **params) -> httpx.Response:
    return client.post(f"{url}/v1/{endpoint}", content=path.read_bytes(), params=params,
                       headers={"Content-Type": "image/jpeg" if path.suffix == ".jpg" else "image/png"})


def test_onnxruntime_serves_an_exported_model_as_pytorch_predicts(tiny, tmp_path):
    from convforge.errors import ConfigError
    from convforge.export import to_onnx
    from convforge.serve import load_served

    loaded, images = tiny["loaded"], tiny["images"]
    path = tmp_path / "tiny.onnx"
    to_onnx(loaded.model, path, loaded.input_size, dynamic_batch=True, meta=dict(loaded.meta))
    expected = offline_top(loaded, images)
    for served in (load_served(path, "onnxruntime"), load_served(None, "onnxruntime", loaded=loaded)):
        with running(served, max_batch=8) as (url, _), httpx.Client(timeout=60) as client:
            for image, top in zip(images, expected):
                answer = _post(client, url, image)
                assert answer.status_code == 200, answer.text
                assert_same_top(answer.json()["predictions"][0]["top"], top, atol=1e-5)
            described = client.get(f"{url}/v1/model").json()
            assert described["backend"] == "onnxruntime" and described["explain"] is False
            assert described["classes"] == loaded.classes and described["input_size"] == [3, 16, 16]
            assert _post(client, url, images[0], "explain").status_code == 404
        served.close()
    with pytest.raises(ConfigError, match="not an int8 model"):
        load_served(path, "onnxruntime-int8")
    with pytest.raises(ConfigError, match="--backend onnxruntime"):
        load_served(path, "torch")


def test_onnxruntime_int8_answers_equal_its_offline_session(tiny, tmp_path):
    from convforge.data import normalize
    from convforge.errors import ConfigError
    from convforge.export import quantize_int8, session
    from convforge.export.onnx import run_session
    from convforge.serve import load_served
    from convforge.train.inference import load_images

    loaded, images = tiny["loaded"], tiny["images"]
    calibration = torch.randn((32, *loaded.input_size), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "tiny-int8.onnx"
    quantize_int8(loaded.model, path, loaded.input_size, calibration, meta=dict(loaded.meta))
    views = torch.stack(load_images(images, loaded.input_size[1:], 3))  # the offline decoding, one by one
    offline = torch.cat([torch.from_numpy(run_session(session(path), normalize(view[None], loaded.mean, loaded.std)))
                         for view in views]).softmax(1)
    with running(load_served(path, "onnxruntime-int8"), max_batch=8) as (url, _), httpx.Client(timeout=60) as client:
        files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images]
        answer = client.post(f"{url}/v1/predict", files=files, params={"top_k": 10})
    assert answer.status_code == 200, answer.text
    for item, probabilities in zip(answer.json()["predictions"], offline):
        got = torch.zeros(10)
        for entry in item["top"]:
            got[entry["index"]] = entry["probability"]
        assert torch.allclose(got, probabilities, atol=1e-5), (got, probabilities)
        assert item["top"][0]["index"] == int(probabilities.argmax())
    with pytest.raises(ConfigError, match="--calib-data"):
        load_served(None, "onnxruntime-int8", loaded=loaded)


def _dense(tmp_path, name: str, **kwargs):
    from convforge.serve import load_served
    from convforge.train.inference import load_model, save_loaded

    loaded = load_model(name, **kwargs)
    head = getattr(loaded.model, "head", None)
    if head is not None:  # untrained, the head's bias alone picks one class everywhere; make the mask vary
        with torch.no_grad():
            head.bias.zero_()
            head.weight.mul_(20)
    ckpt = save_loaded(loaded, tmp_path / f"{name}.safetensors")
    loaded = load_model(ckpt)
    return loaded, load_served(None, "torch", loaded=loaded)


def test_segmentation_answers_the_mask_of_convforge_segment(tmp_path):
    from convforge.train.inference import predict
    from helpers import random_images, save_image

    loaded, served = _dense(tmp_path, "unet", num_classes=3, classes=["road", "car", "sky"], mean=[0.5] * 3,
                            std=[0.25] * 3, model_args={"base_width": 4}, image_size=(24, 32))
    image = save_image(tmp_path / "street.png", random_images(1, (20, 28), seed=3)[0])
    offline = predict(loaded, [image])[0]
    with running(served) as (url, _), httpx.Client(timeout=60) as client:
        answer = _post(client, url, image)
        as_json = client.post(f"{url}/v1/predict", params={"format": "json"},
                              files=[("image", ("a.png", image.read_bytes(), "image/png"))] * 2).json()
        described = client.get(f"{url}/v1/model").json()
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(answer.content))
    assert picture.mode == "P" and picture.size == (28, 20)
    assert np.array_equal(np.asarray(picture), offline["mask"].numpy())  # pixel value = class index
    assert json.loads(answer.headers["X-Class-Shares"]) == offline["class_shares"]
    assert len(offline["class_shares"]) == 3  # a mask of every class, not a uniform one
    for item in as_json["predictions"]:
        assert np.array_equal(_png_array(base64.b64decode(item["mask_png"])), offline["mask"].numpy())
        assert item["class_shares"] == offline["class_shares"] and item["size"] == [28, 20]
    assert described["task"] == "segment" and described["explain"] is False


def test_super_resolution_answers_the_image_of_convforge_upscale(tmp_path):
    from convforge.train.inference import predict
    from helpers import random_images, save_image

    loaded, served = _dense(tmp_path, "espcn", model_args={"scale": 2}, mean=[0.5], std=[0.25])
    image = save_image(tmp_path / "photo.png", random_images(1, (9, 13), seed=4)[0])
    offline = predict(loaded, [image])[0]["output"]
    with running(served) as (url, _), httpx.Client(timeout=60) as client:
        answer = _post(client, url, image)
    assert answer.status_code == 200 and answer.headers["X-Scale"] == "2"
    assert np.array_equal(_png_array(answer.content), offline.permute(1, 2, 0).numpy())
    assert _png_array(answer.content).shape == (18, 26, 3)


def test_explain_answers_the_gradcam_overlay_of_the_predicted_class(tiny):
    from convforge.data import normalize
    from convforge.inspect.saliency import explain, overlay
    from convforge.train.inference import load_images

    loaded, image = tiny["loaded"], tiny["images"][0]
    view = load_images([image], loaded.input_size[1:], 3)[0]
    predicted = offline_top(loaded, [image])[0][0]
    saliency = explain(loaded.model, normalize(view[None], loaded.mean, loaded.std), "gradcam")[0]
    expected = np.asarray(overlay(view.permute(1, 2, 0).numpy(), saliency.numpy()))
    target = (predicted["index"] + 1) % 10
    other = np.asarray(overlay(view.permute(1, 2, 0).numpy(), explain(
        loaded.model, normalize(view[None], loaded.mean, loaded.std), "gradcam", target=target)[0].numpy()))
    with running(tiny["served"]) as (url, _), httpx.Client(timeout=60) as client:
        answer = _post(client, url, image, "explain")
        targeted = _post(client, url, image, "explain", target=target)
        bad = client.post(f"{url}/v1/explain", content=b"", headers={"Content-Type": "image/png"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["X-Class"] == predicted["class"]
    assert np.array_equal(_png_array(answer.content), expected)
    assert int(targeted.headers["X-Class-Index"]) == target
    assert np.array_equal(_png_array(targeted.content), other)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "empty_body"


def test_the_python_client(tiny):
    from convforge.serve.client import ServeClientError, describe, predict

    images = tiny["images"]
    expected = offline_top(tiny["loaded"], images, top_k=3)
    with running(tiny["served"]) as (url, _):
        one = predict(images[0], url, top_k=3)
        several = predict(images, url, top_k=3)
        raw = predict(images[1].read_bytes(), url, top_k=3)
        assert describe(url)["classes"] == tiny["loaded"].classes
        with pytest.raises(ServeClientError, match="not_an_image") as info:
            predict(b"not an image at all", url)
        assert info.value.status == 400 and info.value.code == "not_an_image"
    assert_same_top(one["predictions"][0]["top"], expected[0])
    assert_same_top(raw["predictions"][0]["top"], expected[1])
    assert [item["image"] for item in several["predictions"]] == [p.name for p in images]
    for item, top in zip(several["predictions"], expected):
        assert_same_top(item["top"], top)
    with pytest.raises(ServeClientError, match="cannot reach"):
        describe(url, timeout=2)  # the server is gone


def test_a_missing_serve_extra_is_a_clear_error(monkeypatch):
    import importlib.util

    from convforge.errors import ConfigError
    from convforge.serve.errors import require_serve_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'convforge\[serve\]'.*uvicorn"):
        require_serve_extra()


def test_the_command_line_quantizes_a_checkpoint_on_start(tiny, tmp_path):
    from convforge.cli import build_parser
    from convforge.cli.serve import _served
    from convforge.serve.backends import is_int8
    from convforge.train.inference import class_probabilities, load_images
    from helpers import make_image_folder

    make_image_folder(tmp_path / "data", {"train": 4, "test": 1}, size=(16, 16))
    args = build_parser().parse_args(["serve", str(tiny["ckpt"]), "--backend", "onnxruntime-int8", "--calib-data",
                                      f"imagefolder:{tmp_path / 'data'}", "--calib-samples", "8", "--threads", "1"])
    served = _served(args, "cpu")
    folder = Path(served.workdir.name)
    try:
        assert served.backend == "onnxruntime-int8" and served.label == str(tiny["ckpt"])
        assert is_int8(folder / "model.onnx")
        assert served.meta["classes"] == tiny["loaded"].classes
        views = load_images(tiny["images"], (16, 16), 3)
        int8 = torch.stack(served.run_batch(views))
        fp32 = class_probabilities(tiny["loaded"], torch.stack(views))
        assert torch.allclose(int8.sum(1), torch.ones(len(views)), atol=1e-5)
        assert (int8 - fp32).abs().max() < 0.02  # int8 rounding, not another model
    finally:
        served.close()
    assert not folder.exists()
