"""Per-layer sensitivity and --max-drop on the small CNN trained on real digits: a layer made deliberately
sensitive ranks first and is the one kept in float."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convforge.compress.quantization import PTQOptions, quantize_model
from convforge.compress.quantization.sensitivity import (
    fewest_float_layers,
    keep_in_float,
    relative_error,
    quantizable_nodes,
)
from convforge.data import load, normalize
from convforge.errors import ConfigError
from convforge.export import fold_for_inference, onnx_top1
from convforge.train import load_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits(digits_run):
    ckpt = load_checkpoint(digits_run["run_dir"])
    data = load("digits")
    return {"ckpt": ckpt, "calib": normalize(data.train.images[:128], ckpt.mean, ckpt.std),
            "x": normalize(data.test.images, ckpt.mean, ckpt.std), "y": data.test.labels}


@torch.no_grad()
def _sabotaged(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """The folded model with its least used stem channel c switched off (weights 0, bias -1: ReLU gives 0) and
    a weight of 40 reading channel c in every filter of the next convolution: the float function ignores it,
    but the int8 step of that convolution's filters grows to 40/127 and rounds their real weights away."""
    folded = fold_for_inference(model)
    stem, victim = folded.stem[0], folded.stages[0][0][0]
    use = folded.stem(images).mean((0, 2, 3)) * victim.weight.abs().sum((0, 2, 3))
    c = int(use.argmin())
    stem.weight[c] = 0
    stem.bias[c] = -1
    victim.weight[:, c] = 40.0
    return folded


def test_relative_error_definition():
    reference = np.array([[3.0, 4.0]])
    assert relative_error(reference, reference) == 0
    assert relative_error(reference, np.array([[3.0, 5.0]])) == pytest.approx(0.5 / 12.5)  # mean squared difference / mean square


def test_sensitive_layer_ranks_first_and_is_kept_in_float(digits, tmp_path):
    model = _sabotaged(digits["ckpt"].model, digits["calib"])
    size = digits["ckpt"].input_size

    def evaluate(path):
        return onnx_top1(path, digits["x"], digits["y"])

    report = quantize_model(model, tmp_path / "s.onnx", size, digits["calib"], PTQOptions(),
                            then=keep_in_float(digits["calib"].numpy(), max_drop=1.0, evaluate=evaluate))
    ranked = report["sensitivity"]["layers"]
    assert [r["layer"] for r in ranked][0] == "stages.0.0.0"
    assert {r["layer"] for r in ranked} == {"stem.0", "stages.0.0.0", "stages.1.0.0", "fc"}
    assert ranked[0]["error"] > 10 * ranked[1]["error"]
    mixed = report["mixed_precision"]
    assert [layer["layer"] for layer in mixed["float_layers"]] == ["stages.0.0.0"]
    assert mixed["met"] and mixed["drop"] <= 1.0
    assert mixed["trials"][0]["drop"] > 5.0  # all int8: the sabotaged layer costs accuracy
    fp32, int8 = onnx_top1(report["fp32_onnx"], digits["x"], digits["y"]), evaluate(report["onnx"])
    assert fp32 == mixed["fp32_top1"] and fp32 - int8 == pytest.approx(mixed["drop"])  # the written model
    import onnx

    graph = onnx.load(report["onnx"]).graph
    weights = {init.name: init.data_type for init in graph.initializer}
    assert weights["stages.0.0.0.weight"] == onnx.TensorProto.FLOAT  # kept in float: weights ...
    producer = {out: node.op_type for node in graph.node for out in node.output}
    victim = next(node for node in graph.node if node.name == ranked[0]["node"])
    assert producer[victim.input[0]] != "DequantizeLinear"  # ... and the activation it reads
    assert weights["stages.1.0.0.weight_quantized"] == onnx.TensorProto.INT8  # the others are int8
    assert [n["layer"] for n in quantizable_nodes(report["fp32_onnx"])] == ["stem.0", "stages.0.0.0", "stages.1.0.0",
                                                                            "fc"]


def test_large_max_drop_keeps_every_layer_in_int8(digits, tmp_path):
    report = quantize_model(digits["ckpt"].model, tmp_path / "d.onnx", digits["ckpt"].input_size, digits["calib"],
                            then=keep_in_float(digits["calib"].numpy(), max_drop=100.0,
                                               evaluate=lambda p: onnx_top1(p, digits["x"], digits["y"])))
    assert report["mixed_precision"]["float_layers"] == [] and len(report["mixed_precision"]["trials"]) == 1


def test_search_stops_at_the_first_k_within_the_target():
    ranked = [{"layer": f"l{i}", "node": f"n{i}"} for i in range(4)]
    scores = {0: 90.0, 1: 95.0, 2: 99.5, 3: 99.9, 4: 100.0}  # top-1 with k layers in float; fp32 100
    result = fewest_float_layers(ranked, lambda excluded: len(excluded), lambda k: scores[k], 100.0, 0.5)
    assert [layer["layer"] for layer in result["float_layers"]] == ["l0", "l1"] and result["met"]
    assert [t["float_layers"] for t in result["trials"]] == [0, 1, 2]
    unmet = fewest_float_layers(ranked, lambda excluded: len(excluded), lambda k: scores[k] - 5, 100.0, 0.5)
    assert not unmet["met"] and len(unmet["float_layers"]) == 4
    with pytest.raises(ConfigError, match="--max-drop"):
        fewest_float_layers(ranked, len, lambda k: 0.0, 100.0, -1)
    with pytest.raises(ConfigError, match="--data"):
        keep_in_float(np.zeros((1, 1, 8, 8), np.float32), max_drop=1.0)
