"""Pruning: structured pruning on each structure of the zoo (residual, concatenation, depthwise, inverted
residual, layer scale), keep-ratio 1.0, targets out of reach, global magnitude, pruned checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from convforge.compress import prune
from convforge.compress.pipeline import prune_checkpoint
from convforge.errors import ConfigError, ConvforgeError
from convforge.measure import count_macs
from convforge.models import create_model
from convforge.models.convnext import ConvNeXt
from convforge.models.densenet import DenseNet
from convforge.models.mobilenet_v2 import MobileNetV2
from convforge.models.resnet import Bottleneck, ResNet
from convforge.train import load_checkpoint
from convforge.train.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics so that a wrong channel slice changes the outputs."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


# name -> (builder, input size, structure it exercises)
ZOO = {
    "resnet20 (residual, option-A pad)": (lambda: create_model("resnet20", num_classes=10), (3, 16, 16)),
    "resnet20-B (residual, projection)": (lambda: create_model("resnet20", num_classes=10, shortcut="B"), (3, 16, 16)),
    "densenet (concatenation)": (lambda: DenseNet(4, (2, 2), 8, num_classes=10, cifar_stem=True), (3, 16, 16)),
    "mobilenet_v2 (depthwise, inverted residual)": (lambda: MobileNetV2(num_classes=10, width_mult=0.25), (3, 32, 32)),
    "convnext (depthwise 7x7, LayerNorm, layer scale)": (
        lambda: ConvNeXt((1, 2), (16, 32), num_classes=10, layer_scale=0.5), (3, 32, 32)),
    "resnext (grouped 3x3, 8 groups of 4)": (
        lambda: ResNet(Bottleneck, (1, 1, 1, 1), num_classes=10, groups=8, width_per_group=4), (3, 32, 32)),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_structured_pruning_reaches_macs_target_and_keeps_shapes(name):
    build, size = ZOO[name]
    torch.manual_seed(0)
    model = _randomize_norms(build())
    x = torch.randn(3, *size)
    result = prune(model, size, "l1-filter", target_macs=0.5)
    pruned = result.model.eval()
    assert pruned(x).shape == model(x).shape == (3, 10)
    macs = count_macs(pruned, size)
    assert macs == result.macs_after
    assert 0.475 <= macs / count_macs(model, size) <= 0.5  # within 5% of the target, never above
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    # physically fewer channels: some convolution got narrower
    narrower = [n for (n, a), b in zip(model.named_modules(), pruned.modules())
                if isinstance(a, nn.Conv2d) and b.out_channels < a.out_channels]
    assert narrower
    assert model(x).shape == (3, 10)  # the original is untouched


@pytest.mark.parametrize("name", list(ZOO))
def test_keep_ratio_one_leaves_outputs_unchanged(name):
    build, size = ZOO[name]
    torch.manual_seed(0)
    model = _randomize_norms(build())
    x = torch.randn(2, *size)
    for kwargs in ({"sparsity": 0.0}, {"target_macs": 1.0}):
        pruned = prune(model, size, "l1-filter", **kwargs).model.eval()
        assert torch.equal(pruned(x), model(x))


def test_pruned_channels_are_the_removed_ones():
    """Zeroing the channels pruning removes gives the pruned model's outputs (consistent slicing)."""
    torch.manual_seed(0)
    model = _randomize_norms(create_model("resnet20", num_classes=10, shortcut="B"))
    size = (3, 16, 16)
    result = prune(model, size, "l1-filter", sparsity=0.0)
    assert result.macs_after == result.macs_before
    # the same model, pruned by 30% of channels, still runs and its widths are recorded per layer
    result = prune(model, size, "l1-filter", sparsity=0.3)
    changed = [row for row in result.plan if row["out"][0] != row["out"][1]]
    assert changed and all(row["out"][1] >= math.ceil(0.1 * row["out"][0]) for row in result.plan)


@pytest.mark.parametrize("method", ["l2-filter", "bn-scale", "random"])
def test_other_structured_methods(method):
    torch.manual_seed(0)
    model = _randomize_norms(create_model("resnet20", num_classes=10))
    result = prune(model, (3, 16, 16), method, target_macs=0.6)
    assert 0.57 <= result.macs_ratio <= 0.6
    assert result.model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_unreachable_target_names_the_reachable_minimum():
    model = create_model("resnet20", num_classes=10)
    with pytest.raises(ConvforgeError, match=r"reachable minimum is --target-macs 0\.\d+"):
        prune(model, (3, 16, 16), "l1-filter", target_macs=0.01)
    with pytest.raises(ConfigError, match="does not reduce dense MACs"):
        prune(model, (3, 16, 16), "global-magnitude", target_macs=0.5)
    with pytest.raises(ConfigError, match="exactly one"):
        prune(model, (3, 16, 16), "l1-filter")


def test_dry_run_changes_nothing():
    model = _randomize_norms(create_model("resnet20", num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, (3, 16, 16), "l1-filter", target_macs=0.5, dry_run=True)
    assert result.model is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    real = prune(model, (3, 16, 16), "l1-filter", target_macs=0.5)
    assert result.macs_after == real.macs_after and result.params_after == real.params_after
    assert {"layer", "in", "out", "macs"} <= set(result.plan[0])


def test_global_magnitude_respects_the_per_layer_minimum():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    with torch.no_grad():  # make one layer tiny in magnitude: global ranking would wipe it out
        model.layer2[0].conv1.weight.mul_(1e-4)
    result = prune(model, (3, 16, 16), "global-magnitude", sparsity=0.9, min_share=0.05)
    pruned = result.model
    total = zeros = 0
    for name, m in pruned.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            n, z = m.weight.numel(), int((m.weight == 0).sum())
            assert n - z >= math.ceil(0.05 * n), name
            total, zeros = total + n, zeros + z
    assert abs(zeros / total - 0.9) < 0.002
    tiny = next(r for r in result.plan if r["layer"] == "layer2.0.conv1")
    assert tiny["kept"] == math.ceil(0.05 * tiny["weights"])  # held at the minimum, not zeroed
    assert result.macs_after == result.macs_before and "dense" in result.notes[0]
    with pytest.raises(ConvforgeError, match=r"reachable maximum is --sparsity 0\.9\d+"):
        prune(model, (3, 16, 16), "global-magnitude", sparsity=0.99, min_share=0.05)


def _checkpoint(tmp_path, model, size=(3, 16, 16)):
    meta = {"model": {"name": "resnet20", "args": {}, "num_classes": 10, "in_chans": 3},
            "classes": [f"c{i}" for i in range(10)], "input_size": list(size),
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    return save_checkpoint(tmp_path / "model.safetensors", model, meta)


def test_pruned_checkpoint_reloads_with_its_widths(tmp_path):
    torch.manual_seed(0)
    model = _randomize_norms(create_model("resnet20", num_classes=10))
    path = _checkpoint(tmp_path, model)
    report = prune_checkpoint(path, "l1-filter", target_macs=0.5, steps=2, log=lambda _m: None)
    assert 0.475 <= report["macs_ratio"] <= 0.5
    sidecar = json.loads((tmp_path / "model-pruned-l1-filter.json").read_text())
    assert sidecar["pruned"]["shapes"]["layer1.0.conv1.weight"][0] < 16
    loaded = load_checkpoint(report["output"])
    assert count_macs(loaded.model, (3, 16, 16)) == report["macs_after"]
    # a pruned checkpoint can be pruned again, and exported
    again = prune_checkpoint(report["output"], "l1-filter", target_macs=0.8, out=tmp_path / "again",
                             log=lambda _m: None)
    assert load_checkpoint(again["output"]).model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


def test_pruned_checkpoint_outputs_survive_reload(tmp_path):
    torch.manual_seed(0)
    model = _randomize_norms(create_model("resnet20", num_classes=10))
    path = _checkpoint(tmp_path, model)
    report = prune_checkpoint(path, "bn-scale", sparsity=0.4, log=lambda _m: None)
    direct = prune(model, (3, 16, 16), "bn-scale", sparsity=0.4).model.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(load_checkpoint(report["output"]).model(x), direct(x), atol=1e-6)


def test_cli_prune_dry_run_and_bad_target(tmp_path, capsys):
    from convforge.cli import main

    model = create_model("resnet20", num_classes=10)
    path = _checkpoint(tmp_path, model)
    assert main(["prune", str(path), "--method", "l1-filter", "--target-macs", "0.5", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and 0.475 <= report["macs_ratio"] <= 0.5
    assert not (tmp_path / "model-pruned-l1-filter.safetensors").exists()
    assert main(["prune", str(path), "--method", "l1-filter", "--target-macs", "0.02"]) == 2
    assert "reachable minimum" in capsys.readouterr().err
    assert main(["prune", str(path), "--method", "global-magnitude", "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "per-layer sparsity" in out and "dense kernels" in out


def test_round_to_keeps_multiples_of_eight():
    model = create_model("resnet20", num_classes=10)
    result = prune(model, (3, 16, 16), "l1-filter", target_macs=0.5, round_to=8)
    assert result.macs_ratio <= 0.5
    widths = [m.out_channels for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and min(widths) < 16


def test_grouped_convolutions_lose_whole_groups_and_keep_their_group_width():
    from convforge.models.widths import apply_widths, changed_shapes

    torch.manual_seed(0)
    model = _randomize_norms(create_model("resnext50_32x4d", num_classes=10))
    size = (3, 32, 32)
    result = prune(model, size, "l1-filter", target_macs=0.5, round_to=8)
    pruned = result.model.eval()
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    after = dict(pruned.named_modules())
    assert before and any(after[n].groups < m.groups for n, m in before.items())
    for name, original in before.items():
        conv = after[name]
        assert conv.out_channels // conv.groups == original.out_channels // original.groups  # group width kept
        assert conv.in_channels // conv.groups == original.in_channels // original.groups
        assert conv.weight.shape[0] == conv.out_channels and conv.weight.shape[1] * conv.groups == conv.in_channels
    assert count_macs(pruned, size) == result.macs_after <= 0.5 * result.macs_before
    assert any("a whole group at a time" in note for note in result.notes)
    # A checkpoint records only the shapes: rebuilding from them gives the same grouped layers and outputs.
    rebuilt = create_model("resnext50_32x4d", num_classes=10)
    apply_widths(rebuilt, {"shapes": changed_shapes(pruned, create_model("resnext50_32x4d", num_classes=10))})
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(2, *size)
    assert torch.allclose(rebuilt.eval()(x), pruned(x), atol=1e-5)
    assert all(dict(rebuilt.named_modules())[n].groups == after[n].groups for n in before)


def test_fine_tuning_trains_whole_epochs_per_step(tmp_path):
    path = _checkpoint(tmp_path, create_model("resnet20", num_classes=10))
    with pytest.raises(ConfigError, match=r"--finetune-epochs 3 over --steps 2 is 1\.5 epochs per step.*"
                                          r"multiple of --steps \(e\.g\. --finetune-epochs 4\)"):
        prune_checkpoint(path, "l1-filter", target_macs=0.5, finetune_epochs=3, steps=2, data="digits")
    wide = _checkpoint(tmp_path, create_model("resnet20", num_classes=10), size=(3, 16, 20))
    with pytest.raises(ConfigError, match="takes 16x20 inputs.*square images"):
        prune_checkpoint(wide, "l1-filter", target_macs=0.5, finetune_epochs=1, data="digits")


def _fine_tune(digits_run, out, **kwargs):
    return prune_checkpoint(digits_run["run_dir"], "l1-filter", target_macs=0.6, steps=2, finetune_epochs=4,
                            batch_size=64, threads=1, out=out, quiet=True, log=lambda _m: None, **kwargs)


def test_fine_tuning_runs_on_the_engine_and_resumes_after_a_crash(digits_run, tmp_path, monkeypatch):
    from convforge.train import TrainingInterrupted, engine

    whole = _fine_tune(digits_run, tmp_path / "whole.safetensors")
    steps = [entry["finetune"] for entry in whole["history"]]
    assert [s["run_dir"] for s in steps] == [str(tmp_path / "whole.finetune" / f"step-{k}") for k in (1, 2)]
    assert all(s["epochs"] == 2 and s["steps"] > 0 for s in steps)
    assert whole["top1_after"] == whole["history"][-1]["top1_finetuned"] > whole["history"][-1]["top1_pruned"] - 5
    run_config = (tmp_path / "whole.finetune" / "step-2" / "config.yaml").read_text()
    assert "schedule: cosine" in run_config and "warmup_epochs: 0" in run_config and "weight_decay: 0.0005" in run_config

    real_train, calls = engine.train, []

    def crash_in_step_two(config, **kwargs):
        def stop(epoch, record):
            if Path(config.out).name == "step-2" and epoch == 1:
                raise TrainingInterrupted(130)

        calls.append(config)
        return real_train(config, on_epoch_end=stop, **kwargs)

    monkeypatch.setattr(engine, "train", crash_in_step_two)
    with pytest.raises(TrainingInterrupted):
        _fine_tune(digits_run, tmp_path / "crashed.safetensors")
    assert [Path(c.out).name for c in calls] == ["step-1", "step-2"]
    monkeypatch.setattr(engine, "train", lambda config, **kwargs: calls.append(config) or real_train(config, **kwargs))
    again = _fine_tune(digits_run, tmp_path / "crashed.safetensors")
    assert calls[2].resume == str(tmp_path / "crashed.finetune" / "step-2") and len(calls) == 3  # step 1 reused
    assert again["history"] == [{**e, "finetune": {**e["finetune"], "run_dir": e["finetune"]["run_dir"].replace(
        "whole", "crashed"), "seconds": a["finetune"]["seconds"]}} for e, a in zip(whole["history"], again["history"])]
    want = load_checkpoint(whole["output"]).model.state_dict()
    got = load_checkpoint(again["output"]).model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ConfigError, match=r"holds the fine-tuning runs of another prune command \(different lr\)"):
        _fine_tune(digits_run, tmp_path / "crashed.safetensors", lr=0.05)


def test_distilled_fine_tuning_learns_from_the_unpruned_checkpoint(digits_run, tmp_path):
    def run(name, **kwargs):
        return prune_checkpoint(digits_run["run_dir"], "l1-filter", target_macs=0.6, finetune_epochs=1, batch_size=64,
                                threads=1, out=tmp_path / f"{name}.safetensors", quiet=True, log=lambda _m: None,
                                **kwargs)

    with pytest.raises(ConfigError, match="--distill .*add --finetune-epochs N"):
        prune_checkpoint(digits_run["run_dir"], "l1-filter", target_macs=0.6, distill=True, data="digits")
    with pytest.raises(ConfigError, match="--distill .*missing.safetensors: no such checkpoint file"):
        prune_checkpoint(digits_run["run_dir"], "l1-filter", target_macs=0.6, finetune_epochs=1,
                         distill=tmp_path / "missing.safetensors")
    plain, distilled = run("plain"), run("distilled", distill=True)
    config = (tmp_path / "distilled.finetune" / "step-1" / "config.yaml").read_text()
    teacher = str(load_checkpoint(digits_run["run_dir"]).path)
    assert f"teachers:\n- {teacher}\n" in config
    assert "teachers: []" in (tmp_path / "plain.finetune" / "step-1" / "config.yaml").read_text()
    assert distilled["distill"] == distilled["history"][0]["finetune"]["teacher"] == teacher
    assert load_checkpoint(distilled["output"]).meta["compress"]["distill"] == teacher
    # same pruned start, seed and batches: only the soft targets differ, so the tuned weights do
    want, got = (load_checkpoint(r["output"]).model.state_dict() for r in (plain, distilled))
    assert plain["history"][0]["top1_pruned"] == distilled["history"][0]["top1_pruned"]
    assert not all(torch.equal(want[k], got[k]) for k in want)


def test_global_magnitude_fine_tuning_keeps_the_pruned_zeros(digits_run, tmp_path):
    report = prune_checkpoint(digits_run["run_dir"], "global-magnitude", sparsity=0.5, finetune_epochs=1,
                              batch_size=64, threads=1, out=tmp_path / "sparse.safetensors", evaluate_split=None,
                              quiet=True, log=lambda _m: None)
    assert abs(report["sparsity"]["overall"] - 0.5) < 0.01
    assert "keep_sparsity: true" in (tmp_path / "sparse.finetune" / "step-1" / "config.yaml").read_text()


def test_image_folders_load_at_the_checkpoint_input_size(tmp_path, monkeypatch):
    """A checkpoint trained at 8x8 on 12x12 images fine-tunes and evaluates at 8x8."""
    from helpers import make_image_folder

    from convforge.compress import pipeline

    make_image_folder(tmp_path / "images", {"train": 8, "test": 4}, size=(12, 12))
    meta = {"model": {"name": "smallcnn", "args": {}, "num_classes": 3, "in_chans": 3},
            "classes": ["cat", "dog", "fish"], "input_size": [3, 8, 8],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    path = save_checkpoint(tmp_path / "small.safetensors", create_model("smallcnn", num_classes=3, in_chans=3), meta)
    shapes = []
    real_split = pipeline.aligned_split

    def recording(ckpt, data, split):
        part = real_split(ckpt, data, split)
        shapes.append(tuple(part.images.shape[1:]))
        return part

    monkeypatch.setattr(pipeline, "aligned_split", recording)
    report = prune_checkpoint(path, "l1-filter", target_macs=0.7, finetune_epochs=1, data=f"imagefolder:{tmp_path / 'images'}",
                              batch_size=8, threads=1, quiet=True, log=lambda _m: None)
    assert shapes and set(shapes) == {(3, 8, 8)}
    tuned = load_checkpoint(report["history"][0]["finetune"]["run_dir"])
    assert tuned.input_size == (3, 8, 8) and tuned.meta["data"]["train"] == 24


def test_compress_benchmark_smoke_prunes_fine_tunes_controls_and_times(tmp_path):
    """benchmarks/compress.py --smoke: group pruning after a regularised epoch, the control, the speed table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compress_bench", Path(__file__).resolve().parents[1] /
                                                  "benchmarks" / "compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--smoke", "--no-record", "--model", "resnet20", "--method", "group-l2", "--global-pruning",
                          "--normalizer", "max", "--sparsity-epochs", "1", "--threads", "1", "--work", str(tmp_path),
                          "--data", "synthetic:classes=10,size=32,train=128,test=32"])
    assert summary["macs_ratio"] <= 0.5 and summary["params_after"] < summary["params_before"]
    pruned = load_checkpoint(tmp_path / f"{summary['tag']}.safetensors").model
    assert count_macs(pruned, (3, 32, 32)) == summary["macs_after"]
    assert summary["budget_epochs"] == 2 and summary["sparsity_training"]["epochs"] == 1
    assert summary["top1_control"] is not None and summary["finetune"]["epochs"] == 1
    speed = summary["speed"]
    for backend in ("torch", "torch-fused"):
        ratio = speed[f"{backend}/pruned"]["images_per_s"] / speed[f"{backend}/unpruned"]["images_per_s"]
        assert summary["speedup"][backend] == pytest.approx(ratio)
    assert max(summary["fused_max_abs_diff"].values()) < 1e-3  # BatchNorm folding keeps the logits
    saved = json.loads((tmp_path / f"{summary['tag']}.summary.json").read_text())
    assert saved["macs_after"] == summary["macs_after"]
