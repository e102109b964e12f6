"""Binary networks: XNOR-Net / DoReFa weights, sign activations and their straight-through gradients, the layer
swap, training on the engine, and the ONNX export that ONNX Runtime runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from convforge import TrainConfig, fit
from convforge.data import load, normalize
from convforge.errors import CheckpointError, ConfigError
from convforge.export.onnx import run_session, session
from convforge.export.qat import export_quantized
from convforge.layers.binary import BinaryConv2d, RealShortcut, RPReLU, binarize_weight, binary_activation
from convforge.models import create_model
from convforge.train.binary import latent_state_dict, prepare_binary
from convforge.train.inference import load_model
from convforge.train.qat import prepare_from_record
from convforge.train.init import load_init
from helpers import read_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_xnor_weights_are_plus_minus_the_mean_magnitude_of_each_output_channel():
    weight = torch.randn(5, 3, 3, 3) * torch.linspace(0.1, 3.0, 5).view(-1, 1, 1, 1)
    binary = binarize_weight(weight, "xnor").numpy()
    alpha = np.abs(weight.numpy()).reshape(5, -1).mean(axis=1)
    for c in range(5):
        low, high = np.unique(binary[c])  # exactly two values per channel ...
        assert low == -high and high == pytest.approx(alpha[c], rel=1e-6)  # ... +-mean|W_c|
    np.testing.assert_array_equal(np.sign(binary), np.where(weight.numpy() >= 0, 1.0, -1.0))


def test_dorefa_weights_share_one_scale_per_layer():
    weight = torch.randn(4, 2, 3, 3)
    binary = binarize_weight(weight, "dorefa").numpy()
    scale = np.float32(np.abs(weight.numpy()).mean())
    assert np.allclose(np.unique(binary), [-scale, scale], rtol=1e-6)


def test_sign_gradient_is_zero_outside_the_clip_range():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    y = binary_activation(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    y.backward(torch.full_like(x, 3.0))
    assert x.grad.tolist() == [0.0, 0.0, 3.0, 3.0, 3.0, 0.0, 0.0]  # hardtanh's derivative: |x| < 1


def test_scaled_sign_gradient_is_hardtanhs_in_units_of_each_channels_deviation():
    x = torch.tensor([[[[0.5, -3.0]], [[0.05, -0.3]]], [[[1.8, -1.5]], [[0.1, 0.0]]]], requires_grad=True)
    scale = x.detach().std(dim=(0, 2, 3), keepdim=True, correction=0)  # per channel: ~1.84 and ~0.16
    out = binary_activation(x, "scaled")
    assert torch.equal(out, binary_activation(x.detach()))  # the same sign forward
    out.backward(torch.full_like(x, 2.0))
    expected = 2.0 * (x.detach().abs() < scale).float() / scale
    torch.testing.assert_close(x.grad, expected)
    assert x.grad[0, 0, 0, 1] == 0 and x.grad[0, 0, 0, 0] > 0 and x.grad[0, 1, 0, 1] == 0  # -3.0, 0.5, -0.3
    assert x.grad[1, 0, 0, 0] > 0  # 1.8 lies within channel 0's deviation: the clipped estimator would drop it


def test_xnor_weight_gradient_is_the_papers_and_dorefa_passes_it_straight():
    torch.manual_seed(0)
    weight = (torch.randn(3, 4) * 0.8).requires_grad_()
    upstream = torch.randn(3, 4)
    (binarize_weight(weight, "xnor") * upstream).sum().backward()
    w, g = weight.detach().numpy(), upstream.numpy()
    sign = np.where(w >= 0, 1.0, -1.0)
    alpha = np.abs(w).mean(axis=1, keepdims=True)
    # d/dW of alpha * sign(W): through alpha (1/n sign(W) per channel) and the clipped straight-through sign
    expected = sign / w.shape[1] * (g * sign).sum(axis=1, keepdims=True) + alpha * g * (np.abs(w) < 1)
    np.testing.assert_allclose(weight.grad.numpy(), expected, rtol=1e-5, atol=1e-6)
    weight.grad = None
    (binarize_weight(weight, "dorefa") * upstream).sum().backward()
    np.testing.assert_array_equal(weight.grad.numpy(), g)


@pytest.mark.parametrize("mode", ["weights", "activations", "weights+activations"])
def test_swap_keeps_first_and_last_layer_in_full_precision(mode):
    gm = prepare_binary(create_model("resnet20"), mode)
    assert type(gm.conv1) is nn.Conv2d and type(gm.linear) is nn.Linear
    binary = [m for m in gm.modules() if isinstance(m, BinaryConv2d)]
    assert len(binary) == 18 and all(m.binary_input == (mode != "weights") for m in binary)
    assert all(m.binary_weight == (mode != "activations") for m in binary)
    relus = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.relu]
    hardtanh = [m for m in gm.modules() if isinstance(m, nn.Hardtanh)]
    assert (len(relus), len(hardtanh)) == ((19, 0) if mode == "weights" else (0, 19))


def test_activations_mode_binarises_the_inputs_and_keeps_the_real_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    layer = BinaryConv2d(conv, binary_input=True, binary_weight=False)
    torch.testing.assert_close(layer(x), conv(torch.where(x >= 0, 1.0, -1.0)))
    exported = layer.export_module()
    torch.testing.assert_close(exported(x), layer(x))
    assert torch.equal(exported[1].weight, conv.weight)  # real weights baked in, after an exact sign
    with pytest.raises(ValueError, match="weights, its inputs or both"):
        BinaryConv2d(conv, binary_input=False, binary_weight=False)


def test_rsign_compares_each_input_channel_with_its_learnable_threshold():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = BinaryConv2d(conv, binary_input=True, binary_weight=False, learnable_threshold=True)
    assert layer.threshold is not None and torch.equal(layer.threshold.detach(), torch.zeros(3))  # starts as sign
    with torch.no_grad():
        layer.threshold.copy_(torch.tensor([0.5, -0.25, 0.0]))
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    shifted = x.detach() - torch.tensor([0.5, -0.25, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), conv(torch.where(shifted >= 0, 1.0, -1.0)))
    layer(x).sum().backward()
    assert layer.threshold.grad is not None and layer.threshold.grad.abs().sum() > 0  # learnt through the STE
    torch.testing.assert_close(layer.threshold.grad, -x.grad.sum(dim=(0, 2, 3)))  # d/dt of sign(x - t)
    exported = layer.export_module()
    torch.testing.assert_close(exported(x.detach()), layer(x.detach()))
    with pytest.raises(ValueError, match="setting of binary inputs"):
        BinaryConv2d(conv, binary_input=False, learnable_threshold=True)


def test_rprelu_is_prelu_between_two_learnable_shifts():
    act = RPReLU(2)
    with torch.no_grad():
        act.shift_in.copy_(torch.tensor([1.0, -1.0]))
        act.prelu.weight.copy_(torch.tensor([0.5, 0.1]))
        act.shift_out.copy_(torch.tensor([0.2, 0.0]))
    x = torch.tensor([[[[0.0, 3.0]], [[-2.0, 1.0]]]])
    # channel 0: x - 1 = (-1, 2) -> (-0.5, 2) + 0.2; channel 1: x + 1 = (-1, 2) -> (-0.1, 2)
    torch.testing.assert_close(act(x), torch.tensor([[[[-0.3, 2.2]], [[-0.1, 2.0]]]]))
    assert torch.equal(RPReLU(3)(x.repeat(1, 2, 1, 1)[:, :3]), F.prelu(x.repeat(1, 2, 1, 1)[:, :3],
                                                                    torch.full((3,), 0.25)))  # starts as PReLU


def test_react_gives_resnet20_rsign_thresholds_and_an_rprelu_of_the_right_width_for_each_relu():
    gm = prepare_binary(create_model("resnet20"), "weights+activations", shortcuts=True, react=True)
    binary = [m for m in gm.modules() if isinstance(m, BinaryConv2d)]
    assert len(binary) == 18 and all(m.threshold.numel() == m.conv.in_channels for m in binary)
    widths = sorted(m.shift_in.numel() for m in gm.modules() if isinstance(m, RPReLU))
    assert widths == [16] * 7 + [32] * 6 + [64] * 6  # the stem's ReLU and two per block
    gm(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(m.threshold.grad is not None for m in binary)
    assert all(m.shift_in.grad is not None for m in gm.modules() if isinstance(m, RPReLU))
    with pytest.raises(ConfigError, match="Bi-Real shortcuts"):
        prepare_binary(create_model("resnet20"), "weights+activations", react=True)
    mlp_head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                             nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12),
                             nn.ReLU(), nn.Linear(12, 5))
    gm = prepare_binary(mlp_head, "weights+activations", shortcuts=True, react=True)
    assert sorted(m.shift_in.numel() for m in gm.modules() if isinstance(m, RPReLU)) == [8, 8, 12]  # 12: the linear's
    assert gm(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_latent_state_of_a_binary_model_is_the_float_models_state():
    model = create_model("resnet20")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    gm = prepare_binary(model, "activations", shortcuts=True)
    assert any(".conv.weight" in key for key in gm.state_dict())  # the wrappers rename the binary layers
    latent = latent_state_dict(gm)
    assert latent.keys() == expected.keys()
    assert all(torch.equal(latent[k], expected[k]) for k in expected)


def test_two_step_binary_training_starts_weights_and_activations_from_the_activations_step(tmp_path, capsys):
    """ReActNet's two steps: binary activations with real weights, then --init that checkpoint with binary
    weights too; the second run starts from the first one's real-valued weights."""
    common = dict(model="smallcnn", data="digits", batch_size=64, threads=1, seed=0, optimizer="adamw", lr=0.01,
                  model_args={"widths": [16, 32, 64]}, binary_shortcuts=True, binary_ste="scaled", binary_react=True)
    fit(TrainConfig(epochs=1, binary="activations", out=str(tmp_path / "step1"), **common), quiet=True)
    step1 = json.loads((tmp_path / "step1" / "last.json").read_text())["quantization"]
    assert (step1["mode"], step1["weights"], step1["activations"]) == ("activations", "float", "sign (+-1)")
    data = load("digits")
    init = load_init(str(tmp_path / "step1" / "last.safetensors"), "smallcnn", "classify", data, {})
    latent = latent_state_dict(load_model(tmp_path / "step1" / "last.safetensors").model)
    float_state = init.model.state_dict()
    assert all(torch.equal(float_state[k], v) for k, v in latent.items() if k in float_state)
    assert {k for k in latent if k not in float_state} == init.binary_state.keys()  # thresholds and RPReLU
    assert any("real-valued (latent) weights" in note for note in init.notes)
    step1_model = load_model(tmp_path / "step1" / "last.safetensors").model
    thresholds = {k: v for k, v in step1_model.state_dict().items() if k.endswith(".threshold")}
    assert thresholds and all(torch.equal(init.binary_state[k], v) for k, v in thresholds.items())
    fit(TrainConfig(epochs=1, binary="weights+activations", init=str(tmp_path / "step1" / "last.safetensors"),
                    out=str(tmp_path / "step2"), **common), quiet=False)
    meta = json.loads((tmp_path / "step2" / "last.json").read_text())
    assert meta["quantization"]["mode"] == "weights+activations" and meta["init"]["epoch"] == 1
    assert "react" in meta["quantization"]
    carried = f"{len(init.binary_state)} binary-network tensor(s) of the checkpoint carried over"
    assert carried in capsys.readouterr().err
    step2 = [m for m in load_model(tmp_path / "step2").model.modules() if isinstance(m, BinaryConv2d)]
    assert len(step2) == 2 and all(m.binary_weight and m.binary_input and m.ste == "scaled" for m in step2)
    assert meta["quantization"]["ste"] == "scaled"


def _bireal_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ResNet-20 as Bi-Real Net computes it, written out: h = BN(conv(sign(u))) + u around every binary
    convolution (u averaged 2x2 and its channels doubled where the convolution strides and widens), no ReLU."""
    def real(u, conv):
        if conv.stride[0] == 2:
            u = F.avg_pool2d(u, 2)
        return u.repeat(1, conv.out_channels // conv.in_channels, 1, 1)

    u = model.bn1(model.conv1(x))
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage.children():
            h = block.bn1(block.conv1(u)) + real(u, block.conv1.conv)
            u = block.bn2(block.conv2(h)) + h
    return model.linear(u.mean(dim=(2, 3)))


def test_bireal_shortcuts_make_resnet20_a_bireal_network():
    torch.manual_seed(0)
    gm = prepare_binary(create_model("resnet20"), "weights+activations", shortcuts=True)
    for m in gm.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so that a wrong graph shows
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    gm.eval()
    shortcuts = [m for m in gm.modules() if isinstance(m, RealShortcut)]
    assert len(shortcuts) == 18 and sum(m.stride == 2 and m.repeat == 2 for m in shortcuts) == 2
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert not any(t.endswith(".shortcut") for t in called)  # the blocks' own identity shortcuts were re-pointed
    assert not any(isinstance(m, (nn.Hardtanh, nn.ReLU)) for m in gm.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _bireal_reference(gm, x), rtol=1e-4, atol=1e-4)


def test_bireal_shortcuts_keep_a_projection_shortcut_and_skip_narrowing_convolutions():
    gm = prepare_binary(create_model("resnet20", shortcut="B"), "weights+activations", shortcuts=True)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"layer2.0.shortcut.0", "layer3.0.shortcut.0"} <= called  # projections (with weights) stay
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mobile = prepare_binary(create_model("mobilenet_v2_cifar", num_classes=10), "weights+activations", shortcuts=True)
    projections = [m for name, m in mobile.named_modules() if isinstance(m, BinaryConv2d)
                   and m.conv.out_channels < m.conv.in_channels]
    assert projections and len([m for m in mobile.modules() if isinstance(m, RealShortcut)]) == (
        len([m for m in mobile.modules() if isinstance(m, BinaryConv2d)]) - len(projections))


def test_binary_settings_are_checked():
    with pytest.raises(ConfigError, match="weights\\+activations"):
        TrainConfig(binary="signs").validate()
    with pytest.raises(ConfigError, match="--binary"):
        TrainConfig(binary_method="xnor").validate()
    with pytest.raises(ConfigError, match="xnor"):
        TrainConfig(binary="weights", binary_method="sign").validate()
    with pytest.raises(ConfigError, match="add --binary weights\\+activations"):
        TrainConfig(binary_shortcuts=True).validate()
    with pytest.raises(ConfigError, match="with --binary weights the activations are already real"):
        TrainConfig(binary="weights", binary_shortcuts=True).validate()
    with pytest.raises(ConfigError, match="binary_ste must be one of clipped, scaled"):
        TrainConfig(binary="activations", binary_ste="wide").validate()
    with pytest.raises(ConfigError, match="with --binary weights the activations are real"):
        TrainConfig(binary="weights", binary_ste="scaled").validate()
    with pytest.raises(ConfigError, match="is a setting of binary activations"):
        TrainConfig(binary_ste="scaled").validate()
    with pytest.raises(ConfigError, match="add --binary-shortcuts"):
        TrainConfig(binary="weights+activations", binary_react=True).validate()
    with pytest.raises(ConfigError, match="--binary-react is a setting of binary networks"):
        TrainConfig(binary_react=True).validate()


@pytest.fixture(scope="module", params=["plain", "bireal", "react"])
def binary_run(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("binary") / "run"
    shortcuts, react = request.param != "plain", request.param == "react"
    summary = fit(TrainConfig(model="smallcnn", data="digits", epochs=4, batch_size=64, threads=1, seed=0,
                              optimizer="adamw", lr=0.01,  # Adam, as XNOR-Net and Bi-Real Net train
                              model_args={"widths": [16, 32, 64]}, binary="weights+activations",
                              binary_shortcuts=shortcuts, binary_react=react, out=str(out)),
                  quiet=True)
    return {"summary": summary, "run_dir": out, "shortcuts": shortcuts, "react": react}


def test_a_tiny_binary_network_trains(binary_run):
    records = read_jsonl(binary_run["run_dir"] / "metrics.jsonl")
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    assert binary_run["summary"]["test_top1"] > 50  # ten classes: chance is 10%
    meta = json.loads((binary_run["run_dir"] / "best.json").read_text())["quantization"]
    assert (meta["kind"], meta["mode"], meta["method"], meta["ste"]) == ("binary", "weights+activations", "xnor",
                                                                         "clipped")
    assert meta["full_precision"] == ["stem.0", "fc"]
    assert ("shortcuts" in meta) == binary_run["shortcuts"] and ("react" in meta) == binary_run["react"]
    with pytest.raises(CheckpointError, match="unknown 'quantization' record"):
        prepare_from_record(create_model("smallcnn"), {**meta, "ste": "wide"}, "damaged.safetensors")
    rebuilt = load_model(binary_run["run_dir"]).model  # the checkpoint's record rebuilds the same graph
    assert len([m for m in rebuilt.modules() if isinstance(m, RealShortcut)]) == (2 if binary_run["shortcuts"] else 0)
    assert any(isinstance(m, RPReLU) for m in rebuilt.modules()) == binary_run["react"]


def test_onnx_runtime_runs_the_exported_binary_model_as_pytorch_does(binary_run, tmp_path):
    loaded = load_model(binary_run["run_dir"])
    report = export_quantized(loaded.model, tmp_path / "binary.onnx", loaded.input_size, meta=dict(loaded.meta))
    data = load("digits")
    x = normalize(data.test.images, loaded.mean, loaded.std)
    with torch.no_grad():
        expected = loaded.model(x).numpy()
    got = run_session(session(report["onnx"]), x)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() < 1e-4  # float arithmetic on the same +-1 inputs and +-alpha weights
    proto = onnx.load(report["onnx"])
    binary_weights = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.dims and len(i.dims) == 4
                      and len(np.unique(numpy_helper.to_array(i))) <= 2 * i.dims[0]]
    assert len(binary_weights) == 2  # the two inner convolutions, each channel exactly +-alpha_c
    for weight in binary_weights:
        assert all(len(np.unique(np.abs(channel))) == 1 for channel in weight)


def test_step_time_benchmark_times_every_variant_and_restores_the_sign():
    """benchmarks/binary_step_time.py --smoke: one timed step per variant, the earlier torch.where sign patched in
    for its own row only."""
    import importlib.util
    from pathlib import Path

    from convforge.layers import binary

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "binary_step_time.py"
    spec = importlib.util.spec_from_file_location("binary_step_time_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sign, backward = binary._sign, binary.ClippedSign.backward
    with bench.where_sign():
        x = torch.tensor([-0.5, 0.0, 2.0], requires_grad=True)
        binary.ClippedSign.apply(x).sum().backward()
        assert x.grad.tolist() == [1.0, 1.0, 0.0] and binary._sign is not sign
    assert binary._sign is sign and binary.ClippedSign.backward is backward
    result = bench.main(["--smoke", "--threads", "1", "--with-where-sign"])
    assert list(result) == [*bench.VARIANTS, bench.WHERE_SIGN] and all(v > 0 for v in result.values())
    text = "\n".join(bench.lines(result, bench.parse_args(["--smoke"])))
    assert "| fp32 |" in text and "1.00x" in text
    bench._stepper(bench.VARIANTS[bench.REACT], 2, "resnet20", bf16=True)()  # the binary ops run under autocast
    timed = {"fp32": 0.4, "fp32, bf16 autocast": 0.2, "fp32, bf16 autocast + torch.compile": 0.25,
             f"{bench.REACT}, bf16 autocast": 0.5, f"{bench.REACT}, bf16 autocast + torch.compile": 0.25}
    text = "\n".join(bench.lines(timed, bench.parse_args(["--smoke", "--with-bf16-compile"])))
    assert "Bi-Real + ReAct step 2.00x as fast (the fp32 network's: 0.80x)" in text and "| 0.500 | 8 | 1.25x |" in text
