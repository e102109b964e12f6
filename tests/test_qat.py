"""Quantization-aware training: the fake-quant arithmetic, BatchNorm folding, the graph swap, ONNX QDQ export
against ONNX Runtime, and --qat on the engine against post-training quantization."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge import TrainConfig, fit
from convforge.config import load_yaml
from convforge.data import load, normalize
from convforge.errors import ConfigError
from convforge.export.onnx import onnx_top1, quantize_int8, run_session, session
from convforge.export.qat import export_quantized, quantize_trained
from convforge.layers.fake_quant import EMA_MOMENTUM, ActivationFakeQuant, QuantConv2d, QuantLinear, fake_quant_weight
from convforge.models import create_model
from convforge.train.inference import load_model
from convforge.train.qat import prepare_qat, quantization_meta

QAT_META = quantization_meta(types.SimpleNamespace(qat="int8", qat_freeze_bn_fraction=0.5, epochs=2, binary=None))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_weights_round_to_per_channel_symmetric_int8_with_straight_through_gradient():
    weight = (torch.randn(6, 3, 3, 3) * torch.linspace(0.01, 2.0, 6).view(-1, 1, 1, 1)).requires_grad_()
    quantized = fake_quant_weight(weight)
    scale = weight.detach().abs().amax(dim=(1, 2, 3)).numpy() / 127
    expected = np.rint(weight.detach().numpy() / scale[:, None, None, None]) * scale[:, None, None, None]
    np.testing.assert_allclose(quantized.detach().numpy(), expected, rtol=0, atol=1e-6)
    levels = quantized.detach().numpy() / scale[:, None, None, None]
    assert np.abs(levels).reshape(6, -1).max(axis=1) == pytest.approx([127] * 6, abs=1e-3)
    quantized.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # every weight lies inside its range


def test_activation_range_is_an_ema_of_batch_min_max_and_outputs_uint8_levels():
    quant = ActivationFakeQuant().train()
    quant(torch.tensor([-1.0, 0.5, 3.0]))
    quant(torch.tensor([-2.0, 1.0, 5.0]))
    low, high = -1.0 + EMA_MOMENTUM * (-2.0 + 1.0), 3.0 + EMA_MOMENTUM * (5.0 - 3.0)
    assert (float(quant.min_val), float(quant.max_val)) == pytest.approx((low, high), abs=1e-6)
    scale, zero = (high - low) / 255, round(-low / ((high - low) / 255))
    quant.eval()
    x = torch.linspace(-3.0, 6.0, 91, requires_grad=True)
    y = quant(x)
    levels = np.clip(np.rint(x.detach().numpy() / scale) + zero, 0, 255)
    np.testing.assert_allclose(y.detach().numpy(), (levels - zero) * scale, atol=1e-5)
    assert int(quant.observed) == 2  # eval mode does not move the range
    assert float(quant(torch.zeros(1))) == 0.0  # zero is exactly representable
    y.sum().backward()
    inside = (x.detach() >= -zero * scale - 1e-6) & (x.detach() <= (255 - zero) * scale + 1e-6)
    assert torch.equal(x.grad, inside.float())  # straight-through inside the range, zero outside


def _conv_bn(seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -1.5, 2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
    return conv, bn


def test_folded_conv_in_eval_is_the_rounded_folded_convolution():
    conv, bn = _conv_bn()
    layer = QuantConv2d(conv, bn).eval()
    x = torch.randn(2, 3, 8, 8)
    std = torch.sqrt(bn.running_var + bn.eps)
    folded = conv.weight.detach() * (bn.weight / std).detach().view(-1, 1, 1, 1)
    scale = folded.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    bias = (bn.bias - bn.weight * bn.running_mean / std).detach()
    expected = F.conv2d(x, torch.round(folded / scale) * scale, bias, padding=1)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)
        float_output = bn.eval()(conv(x))
    assert (layer(x) - float_output).abs().max() < 0.05 * float_output.abs().max()


def test_training_uses_batch_statistics_until_frozen():
    conv, bn = _conv_bn()
    layer = QuantConv2d(conv, bn).train()
    x = torch.randn(8, 3, 8, 8)
    before = bn.running_mean.clone()
    with torch.no_grad():
        y = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), bn.bias, atol=1e-4)  # normalised with the batch's own mean
    assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), bn.weight ** 2, rtol=1e-3)
    assert not torch.equal(bn.running_mean, before)
    layer.bn_frozen.fill_(True)
    frozen_stats = bn.running_mean.clone()
    with torch.no_grad():
        y_frozen = layer(x)
        y_eval = layer.eval()(x)
    assert torch.equal(y_frozen, y_eval) and torch.equal(bn.running_mean, frozen_stats)


def test_zero_gamma_channel_outputs_beta_without_nan():
    conv, bn = _conv_bn()
    with torch.no_grad():
        bn.weight[1] = 0.0
    y = QuantConv2d(conv, bn).train()(torch.randn(4, 3, 8, 8))
    assert torch.isfinite(y).all() and torch.allclose(y[:, 1], torch.full_like(y[:, 1], -0.2))


def _input_is_quantized(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    source = node.args[0]
    while isinstance(source, torch.fx.Node):
        module = gm.get_submodule(source.target) if source.op == "call_module" else None
        if isinstance(module, ActivationFakeQuant):
            return True
        if not (isinstance(module, (nn.MaxPool2d, nn.Dropout, nn.Flatten))
                or (source.op == "call_function" and source.target is torch.flatten)):
            return False
        source = source.args[0]
    return False


@pytest.mark.parametrize("name, unfolded", [("resnet20", 0), ("mobilenet_v2_cifar", 0), ("speednet_small", 3)])
def test_swap_folds_every_batchnorm_after_a_conv_and_quantizes_every_layer_input(name, unfolded):
    model = create_model(name, num_classes=10)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    gm = prepare_qat(model)
    wrapped = [m for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len([m for m in wrapped if isinstance(m, QuantConv2d)]) == convs
    inner = {id(m.bn) for m in wrapped if isinstance(m, QuantConv2d) and m.bn is not None}
    loose = [n for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in inner]
    assert len(loose) == unfolded  # SpeedNet's BatchNorms follow a max-pool: not foldable, they stay float
    layer_nodes = [n for n in gm.graph.nodes if n.op == "call_module"
                   and isinstance(gm.get_submodule(n.target), (QuantConv2d, QuantLinear))]
    assert len(layer_nodes) == len(wrapped)
    assert all(_input_is_quantized(gm, node) for node in layer_nodes)


def _calibrated_tiny(seed: int = 0) -> nn.Module:
    """conv-BN-ReLU, then a 1x1 identity convolution: the output is the quantized ReLU output, read back."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, bias=False))
    with torch.no_grad():
        model[3].weight.copy_(torch.eye(8).view(8, 8, 1, 1))
    gm = prepare_qat(model).train()
    for _ in range(5):
        gm(torch.randn(16, 3, 8, 8))
    return gm.eval()


def test_onnx_runtime_qdq_equals_fake_quant_within_one_step(tmp_path):
    gm = _calibrated_tiny()
    report = export_quantized(gm, tmp_path / "tiny.onnx", (3, 8, 8), meta=QAT_META)
    step = float(next(m for m in gm.modules() if isinstance(m, ActivationFakeQuant)
                      and float(m.min_val) >= 0).qparams()[0])  # the ReLU output's quantizer
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = gm(x).numpy()
    got = run_session(session(report["onnx"]), x)
    steps = np.abs(got - expected) / step
    assert steps.max() <= 1.001  # at most one quantization step ...
    assert (steps > 0.01).mean() <= 0.01  # ... on at most 1% of the elements
    proto = onnx.load(report["onnx"])
    int8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 2  # both weights stored as int8, not float + QuantizeLinear
    assert {n.op_type for n in proto.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}


@pytest.fixture(scope="module")
def qat_run(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "run"
    summary = fit(TrainConfig(init=str(digits_run["run_dir"]), qat="int8", epochs=2, lr=0.01, batch_size=64,
                              threads=1, out=str(out)), quiet=True)
    return {"summary": summary, "run_dir": out}


def test_qat_checkpoint_describes_itself_and_exports_to_int8_matching_pytorch(qat_run, tmp_path):
    meta = json.loads((qat_run["run_dir"] / "best.json").read_text())
    assert meta["quantization"]["kind"] == "qat" and meta["quantization"]["freeze_bn_epoch"] == 1
    loaded = load_model(qat_run["run_dir"])
    assert any(isinstance(m, ActivationFakeQuant) and int(m.observed) > 0 for m in loaded.model.modules())
    data = load("digits")
    report = quantize_trained(loaded, loaded.input_size, tmp_path / "qat.onnx", data)
    assert report["top1_torch"] == pytest.approx(qat_run["summary"]["test_top1"])
    x = normalize(data.test.images, loaded.mean, loaded.std)
    with torch.no_grad():
        torch_top1 = loaded.model(x).argmax(1).numpy()
    onnx_top1_classes = run_session(session(report["onnx"]), x).argmax(1)
    assert (onnx_top1_classes == torch_top1).all()  # top-1 identical on every test image
    assert report["top1_int8"] == report["top1_torch"]
    assert report["bytes"] < 0.4 * report["fp32_bytes"]  # int8 weights


def test_qat_keeps_or_improves_int8_accuracy_over_post_training_quantization(digits_run, qat_run, tmp_path):
    data = load("digits")
    parent = load_model(digits_run["run_dir"])
    calibration = normalize(data.train.images[:256], parent.mean, parent.std)
    ptq = quantize_int8(parent.model, tmp_path / "ptq.onnx", parent.input_size, calibration)
    test = normalize(data.test.images, parent.mean, parent.std)
    labels = torch.as_tensor(data.test.labels)
    ptq_top1 = onnx_top1(ptq["onnx"], test, labels)
    loaded = load_model(qat_run["run_dir"])
    qat = export_quantized(loaded.model, tmp_path / "qat.onnx", loaded.input_size, meta=dict(loaded.meta))
    qat_top1 = onnx_top1(qat["onnx"], normalize(data.test.images, loaded.mean, loaded.std), labels)
    assert qat_top1 >= ptq_top1


def test_qat_settings_are_checked():
    with pytest.raises(ConfigError, match="int8"):
        TrainConfig(qat="int4").validate()
    with pytest.raises(ConfigError, match="--qat int8"):
        TrainConfig(qat_freeze_bn_fraction=0.5).validate()
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        TrainConfig(qat="int8", qat_freeze_bn_fraction=1.5).validate()
    with pytest.raises(ConfigError, match="choose one"):
        TrainConfig(qat="int8", binary="weights").validate()


def test_init_from_a_qat_checkpoint_is_refused(qat_run, tmp_path):
    with pytest.raises(ConfigError, match="float model"):
        fit(TrainConfig(init=str(qat_run["run_dir"]), qat="int8", epochs=1, out=str(tmp_path / "again")), quiet=True)


def test_quantize_command_exports_a_qat_checkpoint_without_calibration(qat_run, tmp_path, capsys):
    from convforge.cli import main

    out = tmp_path / "model-int8.onnx"
    assert main(["quantize", str(qat_run["run_dir"]), "--out", str(out), "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["onnx"] == str(out) and out.is_file() and report["format"] == "QDQ"
    assert report["eval"] == {"data": "digits", "split": "test", "images": 360}  # the checkpoint's own data
    assert report["top1_int8"] == report["top1_torch"] == pytest.approx(qat_run["summary"]["test_top1"])
    assert set(report["images_per_s_batch256"]) == {"torch eager fp32", "onnxruntime fp32", "onnxruntime int8"}


def _benchmark_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quantization_training.py"
    spec = importlib.util.spec_from_file_location("quantization_training_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quantization_training_benchmark_smoke(tmp_path):
    """benchmarks/quantization_training.py --smoke: fp32 -> PTQ and QAT int8 with speed; binary twins."""
    bench = _benchmark_module()
    results = Path(bench.__file__).parent / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    result = bench.main(["--smoke", "--threads", "1", "--work", str(tmp_path)])
    qat = result["qat"]
    assert qat["qat"]["epochs"] == 1 and qat["qat"]["model"] == "smallcnn"
    assert qat["export"]["top1_int8"] == qat["export"]["top1_torch"] == pytest.approx(qat["qat"]["test_top1"])
    assert 0 <= qat["ptq_top1"] <= 100 and (tmp_path / "qat" / "fp32" / "ptq-int8.onnx").is_file()
    assert set(qat["export"]["images_per_s_batch256"]) == {"torch eager fp32", "onnxruntime fp32", "onnxruntime int8"}
    runs = result["binary"]["runs"]
    assert list(runs) == ["binary weights+activations", "binary weights", "fp32"]
    assert all(run["epochs"] == 1 and run["model"] == "resnet20" for run in runs.values())
    binary = json.loads((Path(runs["binary weights"]["run_dir"]) / "best.json").read_text())["quantization"]
    assert binary["mode"] == "weights"
    assert result["binary"]["export"]["top1_onnx"] == pytest.approx(runs["binary weights+activations"]["test_top1"])
    assert (results.read_text() if results.exists() else None) == before  # --smoke records nothing
    assert json.loads((tmp_path / "result.json").read_text())["qat"]["ptq_top1"] == qat["ptq_top1"]


def test_two_step_binary_benchmark_starts_each_binary_network_from_its_real_weight_step(tmp_path):
    """--binary-init-epochs K: K epochs with real weights (fp32 for binary weights, binary activations for
    weights+activations), then each binary network from that step's last checkpoint for the remaining epochs,
    while the twin trains all of them in fp32; a second call reuses the completed runs."""
    bench = _benchmark_module()
    with pytest.raises(SystemExit):
        bench.parse_args(["--binary-epochs", "4", "--binary-init-epochs", "4"])
    argv = ["--smoke", "--part", "binary", "--binary-init-epochs", "1", "--binary-shortcuts", "--binary-ste", "scaled",
            "--threads", "1", "--work", str(tmp_path)]
    runs = bench.main(argv)["binary"]["runs"]
    assert list(runs) == ["activations stage (epochs 1-1)", "binary weights+activations", "fp32 stage (epochs 1-1)",
                          "binary weights", "fp32"]
    assert [run["epochs"] for run in runs.values()] == [1, 1, 1, 1, 2]
    for name, first in (("binary weights+activations", "activations stage (epochs 1-1)"),
                        ("binary weights", "fp32 stage (epochs 1-1)")):
        init = json.loads((Path(runs[name]["run_dir"]) / "best.json").read_text())["init"]
        assert Path(init["checkpoint"]) == (Path(runs[first]["run_dir"]) / "last.safetensors").resolve()
    stage = json.loads((Path(runs["activations stage (epochs 1-1)"]["run_dir"]) / "last.json").read_text())
    assert stage["quantization"]["mode"] == "activations" and "shortcuts" in stage["quantization"]
    assert stage["quantization"]["ste"] == "scaled"
    again = bench.main(argv)["binary"]["runs"]
    assert all("bench_wall_s" not in run for run in again.values())  # nothing retrained
    assert {name: run["test_top1"] for name, run in again.items()} == {n: r["test_top1"] for n, r in runs.items()}


def test_binary_benchmark_distils_the_react_network_from_the_twin(tmp_path):
    """--binary-react --binary-distill: the twin trains first, and the weights+activations network (ReActNet's
    activations) learns from its last checkpoint; the binary-weights network trains as before."""
    bench = _benchmark_module()
    with pytest.raises(SystemExit):
        bench.parse_args(["--binary-react"])
    argv = ["--smoke", "--part", "binary", "--binary-shortcuts", "--binary-react", "--binary-distill",
            "--threads", "1", "--work", str(tmp_path)]
    result = bench.main(argv)["binary"]
    runs = result["runs"]
    assert list(runs) == ["fp32", "binary weights+activations", "binary weights"]
    config = load_yaml(Path(runs["binary weights+activations"]["run_dir"]) / "config.yaml")
    assert config["teachers"] == [str(Path(runs["fp32"]["run_dir"]) / "last.safetensors")]
    assert load_yaml(Path(runs["binary weights"]["run_dir"]) / "config.yaml")["teachers"] == []
    record = json.loads((Path(runs["binary weights+activations"]["run_dir"]) / "last.json").read_text())["quantization"]
    assert "react" in record and "shortcuts" in record
    assert result["export"]["top1_onnx"] == pytest.approx(runs["binary weights+activations"]["test_top1"])
    lines = "\n".join(bench.binary_lines(result, bench.parse_args(argv)))
    assert "--binary-react" in lines and "soft targets" in lines


def test_binary_benchmark_can_train_only_the_activation_network_with_bf16_and_compile(tmp_path):
    """--binary-wa-only: the twin and the weights+activations network only; --amp and --compile reach every run's
    config and the recorded lines say so; --binary-weight-decay reaches the binary run only."""
    bench = _benchmark_module()
    args = bench.parse_args(["--binary-wa-only", "--amp", "--compile"])
    assert bench._common(args)["amp"] is True and bench._common(args)["compile"] is True
    assert bench._common(bench.parse_args([]))["compile"] is False
    argv = ["--smoke", "--part", "binary", "--binary-shortcuts", "--binary-wa-only", "--amp", "--threads", "1",
            "--binary-weight-decay", "0", "--work", str(tmp_path)]
    result = bench.main(argv)["binary"]
    assert list(result["runs"]) == ["binary weights+activations", "fp32"]
    decay = {}
    for name, run in result["runs"].items():
        config = load_yaml(Path(run["run_dir"]) / "config.yaml")
        assert config["amp"] is True and config["compile"] is False
        decay[name] = config["weight_decay"]
    assert decay == {"binary weights+activations": 0.0, "fp32": 0.05}  # the twin keeps AdamW's default
    lines = "\n".join(bench.binary_lines(result, bench.parse_args(argv)))
    assert "bf16 autocast (--amp) in every run" in lines and "torch.compile" not in lines
    assert "weight decay 0 in the binary runs" in lines


def test_export_command_points_a_qat_checkpoint_to_quantize(qat_run, tmp_path, capsys):
    from convforge.cli import main

    assert main(["export", str(qat_run["run_dir"]), "--out", str(tmp_path / "m.onnx")]) == ConfigError.exit_code
    assert "convforge quantize CKPT" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
