"""convforge bench / convforge.export.benchmark: measured latency and throughput per backend and batch."""

from __future__ import annotations

import json

import pytest
import torch

from convforge.errors import ConfigError
from convforge.export import benchmark
from convforge.measure import count_macs, count_params
from convforge.measure.bench import parse_input, parse_list, time_fn
from convforge.models import create_model


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_benchmark_rows_per_backend_and_batch():
    model = create_model("smallcnn", num_classes=10, in_chans=3).eval()
    size = (3, 16, 16)
    result = benchmark(model, size, [1, 4], ["torch", "onnxruntime", "onnxruntime-int8"], threads=1,
                       warmup=1, repeats=3)
    assert result["params"] == count_params(model) and result["macs"] == count_macs(model, size)
    assert [(r["backend"], r["batch"]) for r in result["rows"]] == [
        (b, n) for b in ("torch", "onnxruntime", "onnxruntime-int8") for n in (1, 4)]
    for row in result["rows"]:
        assert 0 < row["p50_ms"] <= row["p90_ms"] and row["repeats"] == 3
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["p50_ms"] / 1000))
    assert result["onnx_parity"] <= 1e-4
    assert any("random inputs" in note for note in result["notes"])


def test_time_fn_counts_repeats_after_warmup():
    calls = []
    times = time_fn(lambda: calls.append(1), warmup=2, repeats=4)
    assert len(calls) == 6 and len(times) == 4


def test_bad_bench_options():
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'"):
        benchmark(torch.nn.Conv2d(3, 3, 1), (3, 4, 4), [1], ["tensorrt"])
    with pytest.raises(ConfigError, match="CxHxW"):
        parse_input("32x32")
    with pytest.raises(ConfigError, match="unknown value"):
        parse_list("torch,jax", "--backend", ("torch",))


def test_cli_bench_json(capsys):
    from convforge.cli import main

    code = main(["bench", "resnet20", "--input", "3x16x16", "--batch", "1,2", "--backend", "torch,onnxruntime",
                 "--repeats", "2", "--warmup", "1", "--threads", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input_size"] == [3, 16, 16] and len(result["rows"]) == 4
    assert main(["bench", "no-such-model"]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
