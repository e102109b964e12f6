"""convforge serve over real HTTP (uvicorn on a free localhost port): answers equal the offline prediction, bad
input gets a clear 4xx and leaves the server up, dynamic batching batches, back-pressure, timeouts, metrics."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch

from test_serve_helpers import (
    assert_same_top,
    in_background,
    metric_samples,
    npy_bytes,
    offline_top,
    png_of_zeros,
    running,
    tiny,  # noqa: F401 - a fixture
    tiny_checkpoint,
    wait_for,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _predict_raw(client: httpx.Client, url: str, data: bytes, kind: str = "image/png", **params) -> httpx.Response:
    return client.post(f"{url}/v1/predict", content=data, headers={"Content-Type": kind}, params=params)


def test_answers_equal_the_offline_prediction(tiny):
    loaded, images = tiny["loaded"], tiny["images"]
    expected = offline_top(loaded, images)
    array = np.asarray(np.random.default_rng(5).integers(0, 256, (16, 16, 3)), dtype=np.uint8)
    with running(tiny["served"]) as (url, _), httpx.Client(timeout=60) as client:
        for path, top in zip(images, expected):  # raw bodies, each with its own type
            kind = "image/jpeg" if path.suffix == ".jpg" else "image/png"
            answer = _predict_raw(client, url, path.read_bytes(), kind)
            assert answer.status_code == 200, answer.text
            assert_same_top(answer.json()["predictions"][0]["top"], top)
        files = [("image", (p.name, p.read_bytes(), "application/octet-stream")) for p in images]
        answer = client.post(f"{url}/v1/predict", files=files, params={"top_k": 3})  # one multipart request
        assert answer.status_code == 200, answer.text
        got = answer.json()["predictions"]
        assert [item["image"] for item in got] == [p.name for p in images]
        for item, top in zip(got, expected):
            assert_same_top(item["top"], top[:3])
        answer = _predict_raw(client, url, npy_bytes(array), "application/x-npy")  # decoded pixels, not resized
        assert answer.status_code == 200, answer.text
        assert_same_top(answer.json()["predictions"][0]["top"],
                        offline_top(loaded, [torch.from_numpy(array).permute(2, 0, 1).contiguous()])[0])


def test_a_store_trained_checkpoint_is_served_with_its_recorded_view(tmp_path):
    from convforge.serve import load_served
    from convforge.train.inference import load_model

    preprocess = {"resize": [18, 18], "crop": [16, 16], "crop_pct": 0.875, "interpolation": "bilinear-antialias",
                  "store_size": 40, "train_size": [16, 16]}
    loaded = load_model(tiny_checkpoint(tmp_path / "store.safetensors", extra_meta={"preprocess": preprocess}))
    from test_serve_helpers import image_files

    images = image_files(tmp_path, 3, seed=7)
    with running(load_served(None, "torch", loaded=loaded)) as (url, _), httpx.Client(timeout=60) as client:
        for path, top in zip(images, offline_top(loaded, images)):
            answer = _predict_raw(client, url, path.read_bytes(), "application/octet-stream")
            assert answer.status_code == 200, answer.text
            assert_same_top(answer.json()["predictions"][0]["top"], top)


def _bad_inputs(good: bytes) -> list[tuple[str, dict, int, str]]:
    """(name, request keyword arguments, expected status, expected error code)."""
    png_header = good[:60]
    rgba = np.zeros((16, 16, 4), np.uint8)
    return [
        ("not an image", {"content": b"hello, this is text", "headers": {"Content-Type": "image/png"}}, 400,
         "not_an_image"),
        ("truncated image", {"content": good[: len(good) // 2], "headers": {"Content-Type": "image/png"}}, 400,
         "corrupt_image"),
        ("header only", {"content": png_header, "headers": {"Content-Type": "image/png"}}, 400, "corrupt_image"),
        ("decompression bomb", {"content": png_of_zeros(7000, 7000), "headers": {"Content-Type": "image/png"}}, 413,
         "image_too_large"),
        ("20000 x 20000 px", {"content": png_of_zeros(20000, 20000), "headers": {"Content-Type": "image/png"}}, 413,
         "image_too_large"),
        ("wrong content type", {"content": good, "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("JSON", {"json": {"image": "cat.png"}}, 415, "unsupported_media_type"),
        ("empty body", {"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty_body"),
        ("body over the limit", {"content": good + bytes(300_000), "headers": {"Content-Type": "image/png"}}, 413,
         "body_too_large"),
        ("chunked body over the limit", {"content": iter([bytes(100_000)] * 3), "headers": {"Content-Type": "image/png"}},
         413, "body_too_large"),
        ("wrong channel count", {"content": npy_bytes(rgba), "headers": {"Content-Type": "application/x-npy"}}, 400,
         "wrong_channels"),
        ("two channels", {"content": npy_bytes(rgba[:, :, :2]), "headers": {"Content-Type": "application/x-npy"}},
         400, "wrong_channels"),
        ("float pixels", {"content": npy_bytes(np.zeros((16, 16, 3), np.float32)),
                          "headers": {"Content-Type": "application/x-npy"}}, 400, "wrong_dtype"),
        ("form without a file", {"content": b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nx\r\n--b--\r\n',
                                 "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 400, "no_image"),
        ("too many images", {"files": [("image", ("a.png", good, "image/png"))] * 5}, 413, "too_many_images"),
        ("bad top_k", {"content": good, "headers": {"Content-Type": "image/png"}, "params": {"top_k": "0"}}, 400,
         "bad_parameter"),
    ]


def test_every_bad_input_gets_a_clear_4xx_and_the_server_stays_up(tiny):
    from convforge.serve import Limits

    good = tiny["images"][0].read_bytes()
    expected = offline_top(tiny["loaded"], tiny["images"][:1])[0]
    limits = Limits(max_body_bytes=200_000, max_images=4)
    with running(tiny["served"], limits=limits) as (url, state), httpx.Client(timeout=60) as client:
        for name, request, status, code in _bad_inputs(good):
            answer = client.post(f"{url}/v1/predict", **request)
            assert answer.status_code == status, (name, answer.text)
            error = answer.json()["error"]
            assert (error["status"], error["code"]) == (status, code), name
            assert len(error["message"]) > 20, name
            ok = _predict_raw(client, url, good)  # still up, still right
            assert ok.status_code == 200, (name, ok.text)
            assert_same_top(ok.json()["predictions"][0]["top"], expected)
        samples = metric_samples(client.get(f"{url}/metrics").text)
    assert state.admission.count == 0
    cases = _bad_inputs(good)
    assert samples[("convforge_serve_errors_total", (("code", "image_too_large"),))] == 2
    assert samples[("convforge_serve_errors_total", (("code", "body_too_large"),))] == 2
    assert samples[("convforge_serve_requests_total", (("endpoint", "/v1/predict"), ("status", "200")))] == len(cases)
    assert sum(value for (name, labels), value in samples.items()
               if name == "convforge_serve_requests_total" and dict(labels)["status"].startswith("4")) == len(cases)


def _slow(served, gate: threading.Event):
    """``served`` whose batches wait for ``gate`` (a model that is busy for as long as the test wants); the gate
    starts open, for the warm-up batch."""
    import dataclasses

    gate.set()

    def run_batch(views):
        gate.wait(30)
        return served.run_batch(views)

    return dataclasses.replace(served, run_batch=run_batch)


def test_concurrent_requests_run_in_batches(tiny):
    gate = threading.Event()
    images = tiny["images"]
    expected = offline_top(tiny["loaded"], images)
    count = 24
    with running(_slow(tiny["served"], gate), max_batch=8, max_delay_ms=20) as (url, state), \
            httpx.Client(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        gate.clear()  # the warm-up batch is done; hold the model so that the requests pile up
        threads, answers = in_background(
            lambda i: _predict_raw(client, url, images[i % len(images)].read_bytes()), count)
        wait_for(lambda: state.admission.count == count)
        gate.set()
        for thread in threads:
            thread.join(60)
        samples = metric_samples(client.get(f"{url}/metrics").text)
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        assert_same_top(answer.json()["predictions"][0]["top"], expected[i % len(images)])
    batches = samples[("convforge_serve_batch_size_count", ())]
    assert samples[("convforge_serve_batch_size_sum", ())] == count
    assert samples[("convforge_serve_images_total", ())] == count
    assert batches <= count / 2, batches  # 24 images in at most 12 batches: at least two per batch on average
    assert samples[("convforge_serve_batch_size_bucket", (("le", "8.0"),))] == batches  # never above max_batch
    assert samples[("convforge_serve_queue_wait_seconds_count", ())] == count


def test_a_full_queue_answers_429_with_retry_after_then_recovers(tiny):
    gate = threading.Event()
    good = tiny["images"][0].read_bytes()
    with running(_slow(tiny["served"], gate), max_queue=3, max_delay_ms=0) as (url, state), \
            httpx.Client(timeout=60) as client:
        gate.clear()
        threads, answers = in_background(lambda i: _predict_raw(client, url, good), 3)
        wait_for(lambda: state.admission.count == 3)
        refused = _predict_raw(client, url, good)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        ready = client.get(f"{url}/readyz").json()
        assert ready["in_flight"] == 3
        gate.set()
        for thread in threads:
            thread.join(60)
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert _predict_raw(client, url, good).status_code == 200
        samples = metric_samples(client.get(f"{url}/metrics").text)
    assert samples[("convforge_serve_errors_total", (("code", "queue_full"),))] == 1
    assert samples[("convforge_serve_requests_in_flight", ())] == 0


def test_a_request_over_the_timeout_gets_504_and_the_server_goes_on(tiny):
    gate = threading.Event()
    good = tiny["images"][0].read_bytes()
    with running(_slow(tiny["served"], gate), timeout_s=0.3) as (url, state), httpx.Client(timeout=60) as client:
        gate.clear()
        late = _predict_raw(client, url, good)
        assert late.status_code == 504
        assert late.json()["error"]["code"] == "timeout" and "0.3 s" in late.json()["error"]["message"]
        gate.set()
        assert _predict_raw(client, url, good).status_code == 200
        assert state.admission.count == 0


def test_model_description_health_readiness_and_metrics(tiny):
    meta = tiny["loaded"].meta
    with running(tiny["served"], max_batch=4, max_delay_ms=2, max_queue=7) as (url, _), \
            httpx.Client(timeout=60) as client:
        described = client.get(f"{url}/v1/model").json()
        assert client.get(f"{url}/healthz").json() == {"status": "ok"}
        assert client.get(f"{url}/readyz").status_code == 200
        for _ in range(3):
            assert _predict_raw(client, url, tiny["images"][1].read_bytes(), "image/jpeg").status_code == 200
        metrics = client.get(f"{url}/metrics")
        nowhere, wrong_method = client.get(f"{url}/nowhere"), client.get(f"{url}/v1/predict")
    assert (nowhere.status_code, nowhere.json()["error"]["code"]) == (404, "not_found")
    assert (wrong_method.status_code, wrong_method.json()["error"]["code"]) == (405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"
    assert described["task"] == "classify" and described["name"] == "smallcnn"
    assert described["classes"] == meta["classes"] and described["num_classes"] == 10
    assert described["input_size"] == [3, 16, 16]
    assert described["normalization"] == meta["normalization"]
    assert described["metrics"] == {"test_top1": 12.5}
    assert described["preprocess"]["crop"] == [16, 16]
    assert described["backend"] == "torch" and described["explain"] is True
    assert described["server"]["max_batch"] == 4 and described["server"]["max_queue"] == 7
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = metric_samples(metrics.text)
    assert samples[("convforge_serve_requests_total", (("endpoint", "/v1/predict"), ("status", "200")))] == 3
    assert samples[("convforge_serve_requests_total", (("endpoint", "/v1/model"), ("status", "200")))] == 1
    assert samples[("convforge_serve_request_latency_seconds_count", (("endpoint", "/v1/predict"),))] == 3
    assert samples[("convforge_serve_images_total", ())] == 3  # the warm-up image is not counted
    assert samples[("convforge_serve_queue_depth", ())] == 0


def test_serve_options_out_of_range_are_config_errors(tiny):
    from convforge.errors import ConfigError
    from convforge.serve import ServeOptions, create_app

    for bad in ({"max_batch": 0}, {"max_queue": 0}, {"workers": 0}, {"max_delay_ms": -1}):
        with pytest.raises(ConfigError, match="must be >="):
            create_app(tiny["served"], ServeOptions(**bad))
