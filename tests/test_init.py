"""`convforge train --init CKPT`: fine-tuning from a checkpoint, new or reordered classes, pruned models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from convforge import TrainConfig, load_checkpoint, fit
from convforge.compress.pipeline import prune_checkpoint
from convforge.errors import ConfigError
from convforge.train import read_checkpoint_meta
from convforge.train.init import head_tensors, load_init

HEAD = {"fc.weight", "fc.bias"}


def _data(classes, channels=1, mean=(0.3,), std=(0.4,)):
    return SimpleNamespace(classes=list(classes), num_classes=len(classes), channels=channels, spec="fake",
                           mean=mean, std=std)


def _quiet_train(**kwargs):
    return fit(TrainConfig(epochs=1, batch_size=64, threads=1, **kwargs), quiet=True)


def test_head_tensors_are_those_that_depend_on_the_class_count():
    assert head_tensors("smallcnn", 10, 1, {"widths": [16, 32, 64]}) == {"fc.weight": (0,), "fc.bias": (0,)}
    assert head_tensors("resnet20", 10, 3, {}) == {"linear.weight": (0,), "linear.bias": (0,)}
    fcn = head_tensors("fcn8s_vgg16", 11, 3, {})
    assert fcn["score_fr.weight"] == (0,) and fcn["upscore2.weight"] == (0, 1)  # class-to-class upsampling


def test_same_classes_keep_every_weight_and_the_checkpoint_normalisation(digits_run):
    source = load_checkpoint(digits_run["run_dir"])
    init = load_init(str(digits_run["run_dir"]), "smallcnn", "classify", _data(source.classes), {})
    assert init.meta["init"]["head"] == "kept" and init.model_name == "smallcnn"
    for key, tensor in source.model.state_dict().items():
        assert torch.equal(init.model.state_dict()[key], tensor), key
    assert (init.mean, init.std) == (source.mean, source.std)
    assert any("normalised with the checkpoint's mean/std" in n for n in init.notes)


def test_reordered_classes_reorder_the_head_so_predictions_follow_the_names(digits_run):
    source = load_checkpoint(digits_run["run_dir"])
    reversed_classes = source.classes[::-1]
    init = load_init(str(digits_run["run_dir"]), "smallcnn", "classify", _data(reversed_classes), {})
    assert init.meta["init"]["head"] == "reordered"
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old, new = source.model.eval()(x), init.model.eval()(x)
    assert torch.allclose(new, old.flip(1), atol=1e-6)


def test_new_classes_get_a_fresh_head_and_keep_the_body(digits_run):
    source = load_checkpoint(digits_run["run_dir"]).model.state_dict()
    init = load_init(str(digits_run["run_dir"]), "smallcnn", "classify", _data(["a", "b", "c"]), {})
    state = init.model.state_dict()
    assert init.meta["init"]["head"] == "reinitialised"
    assert state["fc.weight"].shape[0] == 3 and state["fc.weight"].abs().sum() > 0
    for key in source.keys() - HEAD:
        assert torch.equal(state[key], source[key]), key


def test_fine_tuning_starts_from_the_checkpoint_not_from_scratch(digits_run, tmp_path):
    """At a learning rate too small to learn anything in one epoch, only loaded weights score well."""
    before = digits_run["summary"]["test_top1"]
    tuned = _quiet_train(data="digits", init=str(digits_run["run_dir"]), lr=1e-6, out=str(tmp_path / "tuned"))
    scratch = _quiet_train(data="digits", model_args={"widths": [16, 32, 64]}, lr=1e-6, out=str(tmp_path / "scratch"))
    assert tuned["test_top1"] >= before - 1.0 and scratch["test_top1"] < 50.0
    meta = read_checkpoint_meta(tmp_path / "tuned")
    assert meta["init"]["checkpoint"] == str((digits_run["run_dir"] / "best.safetensors").resolve())
    assert meta["model"]["args"] == {"widths": [16, 32, 64]}
    from convforge.report import write_report

    html = write_report([tmp_path / "tuned"], tmp_path / "report.html", evaluate=False).read_text()
    cell = html.split("started from")[1][:400]
    assert "best.safetensors (smallcnn" in cell and "head kept" in cell


def test_pruned_checkpoint_fine_tunes_resumes_and_moves_to_new_classes(digits_run, tmp_path):
    pruned = tmp_path / "pruned.safetensors"
    prune_checkpoint(digits_run["run_dir"], "l1-filter", target_macs=0.5, out=pruned, evaluate_split=None,
                     log=lambda _m: None)
    pruned_params = sum(p.numel() for p in load_checkpoint(pruned).model.parameters())
    run = tmp_path / "tuned"
    summary = _quiet_train(data="digits", init=str(pruned), out=str(run))
    assert summary["params"] == pruned_params
    assert summary["test_top1"] > 80.0
    resumed = fit(TrainConfig(resume=str(run), epochs=2, threads=1), quiet=True)
    assert resumed["epochs"] == 2 and resumed["params"] == pruned_params
    assert sum(p.numel() for p in load_checkpoint(run).model.parameters()) == pruned_params  # eval rebuilds it

    moved = load_init(str(pruned), "smallcnn", "classify", _data(["a", "b", "c"]), {})
    width = load_checkpoint(pruned).model.state_dict()["fc.weight"].shape[1]
    assert tuple(moved.model.state_dict()["fc.weight"].shape) == (3, width)
    assert width < 64  # the head's input was pruned too: the new head keeps that width
    assert moved.meta["pruned"]["shapes"]["fc.weight"] == [3, width]


def test_init_errors_name_the_problem(digits_run, tmp_path):
    path = str(digits_run["run_dir"])
    with pytest.raises(ConfigError, match="holds a 'smallcnn' model but --model is 'resnet20'"):
        load_init(path, "resnet20", "classify", _data(range(10)), {})
    with pytest.raises(ConfigError, match="is a classify checkpoint; this run is --task segment"):
        load_init(path, "smallcnn", "segment", _data(range(10)), {})
    with pytest.raises(ConfigError, match="takes 1-channel images but fake has 3 channel"):
        load_init(path, "smallcnn", "classify", _data(range(10), channels=3), {})
    with pytest.raises(Exception, match="not found"):
        _quiet_train(data="digits", init=str(tmp_path / "missing"), out=str(tmp_path / "x"))


def test_without_data_the_run_uses_the_data_the_checkpoint_names(tmp_path):
    from helpers import TINY_SYNTH

    first = _quiet_train(data=TINY_SYNTH, model_args={"widths": [8, 16, 16]}, out=str(tmp_path / "first"))
    second = _quiet_train(init=str(tmp_path / "first"), out=str(tmp_path / "second"))
    assert first["data"] == second["data"] == TINY_SYNTH
    assert read_checkpoint_meta(tmp_path / "second")["init"]["head"] == "kept"


def test_foreign_weight_files_initialise_the_named_model(digits_run, tmp_path):
    from safetensors.torch import save_file

    from convforge.errors import CheckpointError
    from convforge.train.init import is_foreign_weights

    source = load_checkpoint(digits_run["run_dir"])
    state = source.model.state_dict()
    pickle_file = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pickle_file)  # a DataParallel dump
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    assert is_foreign_weights(str(pickle_file)) and is_foreign_weights(str(plain))
    assert not is_foreign_weights(str(source.path)) and not is_foreign_weights(str(tmp_path / "missing.pth"))
    args = {"widths": [16, 32, 64]}
    for file in (pickle_file, plain):
        init = load_init(str(file), "smallcnn", "classify", _data(source.classes), args)
        assert init.meta["init"]["foreign"] and init.meta["init"]["head"] == "kept"
        assert all(torch.equal(init.model.state_dict()[k], v) for k, v in state.items())
    three = load_init(str(pickle_file), "smallcnn", "classify", _data(["a", "b", "c"]), args)
    assert three.meta["init"]["head"] == "reinitialised" and three.model.state_dict()["fc.weight"].shape[0] == 3
    body = {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(three.model.state_dict()[k], state[k]) for k in body)
    with pytest.raises(CheckpointError, match="name its model with --model NAME"):
        load_init(str(pickle_file), "smallcnn", "classify", _data(source.classes), {})  # default widths differ
    with pytest.raises(CheckpointError, match="do not fit"):
        load_init(str(pickle_file), "resnet20", "classify", _data(source.classes), {})


def test_keep_sparsity_holds_the_pruned_zeros_through_fine_tuning(digits_run, tmp_path):
    from convforge.compress.pruning import prunable_weights

    sparse = tmp_path / "sparse.safetensors"
    prune_checkpoint(digits_run["run_dir"], "global-magnitude", sparsity=0.6, out=sparse, evaluate_split=None,
                     log=lambda _m: None)
    zeros = {k: w == 0 for k, w in prunable_weights(load_checkpoint(sparse).model)}
    held = _quiet_train(init=str(sparse), keep_sparsity=True, out=str(tmp_path / "held"))
    _quiet_train(init=str(sparse), out=str(tmp_path / "free"))
    assert held["test_top1"] > 80.0
    held_weights = dict(prunable_weights(load_checkpoint(tmp_path / "held").model))
    free_weights = dict(prunable_weights(load_checkpoint(tmp_path / "free").model))
    assert all(bool((held_weights[k][z] == 0).all()) for k, z in zeros.items())
    assert all(held_weights[k][~z].ne(0).any() for k, z in zeros.items())  # the rest still trains
    assert any(bool(free_weights[k][z].ne(0).any()) for k, z in zeros.items())  # without it the zeros fill in
    with pytest.raises(ConfigError, match="--keep-sparsity holds the zero weights"):
        TrainConfig(keep_sparsity=True).validate()
