"""ONNX export parity, parity failure, int8 quantization on a small real set (scikit-learn digits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import run_cli

from convforge.compress import prune
from convforge.data import load, normalize
from convforge.export import ParityError, onnx_top1, quantize_int8, session, to_onnx
from convforge.export.onnx import run_session
from convforge.models import create_model
from convforge.models.convnext import ConvNeXt
from convforge.train import load_checkpoint
from convforge.train.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_export_parity_and_sidecar(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    pruned = prune(model, (3, 16, 16), "l1-filter", target_macs=0.5).model.eval()
    report = to_onnx(pruned, tmp_path / "m.onnx", (3, 16, 16), dynamic_batch=True, meta={"note": "kept"})
    assert report["max_abs_diff"] <= 1e-4
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    assert sidecar["note"] == "kept" and sidecar["onnx"]["opset"] == 17
    x = torch.randn(5, 3, 16, 16)  # dynamic batch: another batch size than the example
    assert np.abs(run_session(session(tmp_path / "m.onnx"), x) - pruned(x).detach().numpy()).max() <= 1e-4


def test_export_convnext_layer_norm_and_layer_scale(tmp_path):
    torch.manual_seed(0)
    model = ConvNeXt((1, 1), (16, 32), num_classes=10, layer_scale=0.5).eval()
    assert to_onnx(model, tmp_path / "c.onnx", (3, 32, 32))["max_abs_diff"] <= 1e-4


def test_parity_failure_is_an_error_with_the_difference(tmp_path, monkeypatch, capsys):
    from convforge.cli import main
    from convforge.export import onnx as onnx_module

    model = create_model("resnet20", num_classes=10)
    meta = {"model": {"name": "resnet20", "args": {}, "num_classes": 10, "in_chans": 3},
            "classes": [f"c{i}" for i in range(10)], "input_size": [3, 16, 16],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    path = save_checkpoint(tmp_path / "r.safetensors", model, meta)
    assert main(["export", str(path), "--format", "onnx"]) == 0
    assert "max absolute logit difference" in capsys.readouterr().out
    monkeypatch.setattr(onnx_module, "parity", lambda *a, **k: {"max_abs_diff": 0.0123})
    code = main(["export", str(path)])
    assert code == ParityError.exit_code != 0
    assert "0.0123 > 0.0001" in capsys.readouterr().err


def test_int8_runs_and_stays_within_one_point_on_real_digits(digits_run, tmp_path):
    ckpt = load_checkpoint(digits_run["run_dir"])
    data = load("digits")
    calib = normalize(data.train.images[:256], ckpt.mean, ckpt.std)
    report = quantize_int8(ckpt.model, tmp_path / "d.onnx", ckpt.input_size, calib)
    assert report["format"] == "QDQ" and report["batchnorm_folded"]
    assert report["fp32_parity"] <= 1e-4
    x, y = normalize(data.test.images, ckpt.mean, ckpt.std), data.test.labels
    fp32, int8 = onnx_top1(report["fp32_onnx"], x, y), onnx_top1(report["onnx"], x, y)
    assert fp32 > 80
    assert abs(int8 - fp32) <= 1.0, (fp32, int8)
    with torch.no_grad():
        assert fp32 == pytest.approx(100.0 * float((ckpt.model(x).argmax(1) == y).float().mean()), abs=0.3)
    # weights really are int8
    import onnx

    kinds = {init.data_type for init in onnx.load(report["onnx"]).graph.initializer}
    assert onnx.TensorProto.INT8 in kinds


def test_quantize_needs_calibration_data(digits_run, tmp_path):
    with pytest.raises(Exception, match="calibration"):
        quantize_int8(nn.Conv2d(1, 1, 1), tmp_path / "x.onnx", (1, 8, 8), torch.zeros(0, 1, 8, 8))
    done = run_cli("quantize", digits_run["run_dir"], cwd=tmp_path)
    assert done.returncode == 2 and "--calib-data" in done.stderr


def test_cli_quantize_reports_fp32_and_int8(digits_run, tmp_path, capsys):
    from convforge.cli import main

    out = tmp_path / "digits-int8.onnx"
    code = main(["quantize", str(digits_run["run_dir"]), "--calib-data", "digits", "--calib-samples", "128",
                 "--threads", "1", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and out.with_name(out.name + ".json").is_file()
    assert not out.with_suffix(".json").exists()  # a checkpoint sidecar beside it is never overwritten
    assert report["calibration_images"] == 128 and report["eval"]["images"] == 360
    assert abs(report["top1_int8"] - report["top1_fp32"]) <= 1.0
    assert set(report["images_per_s_batch256"]) == {"torch eager fp32", "onnxruntime fp32", "onnxruntime int8"}
