"""Training recipes: mixup/CutMix, random erasing, stochastic depth, distillation, step schedule, named recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from convforge import TrainConfig, create_model, load_checkpoint, fit
from convforge.errors import ConfigError
from convforge.recipes import apply_recipe, list_recipes, recipe_config
from convforge.train import TrainingInterrupted
from convforge.train.distill import distillation_loss
from convforge.train.mixing import batch_rng, mix_batch, random_erase
from convforge.train.optim import lr_at
from helpers import SHARED, TINY_SYNTH, read_jsonl, run_cli


def _batch(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    return x, torch.arange(n)


def test_mixup_is_a_convex_combination_with_matching_targets():
    x, y = _batch()
    mixed, targets = mix_batch(x, y, mixup_alpha=0.4, cutmix_alpha=0.0, rng=batch_rng(0, 0, 0, 0))
    assert 0.0 <= targets.lam <= 1.0
    partner = targets.y_b  # images are constant = their label, so the mix is known exactly
    expected = targets.lam * y.float() + (1 - targets.lam) * partner.float()
    assert torch.allclose(mixed[:, 0, 0, 0], expected, atol=1e-5)
    assert sorted(partner.tolist()) == y.tolist()  # a permutation of the batch


def test_cutmix_lambda_is_the_share_of_pixels_kept():
    x, y = _batch(size=32)
    for batch in range(10):
        mixed, targets = mix_batch(x, y, mixup_alpha=0.0, cutmix_alpha=1.0, rng=batch_rng(1, 0, batch, 0))
        kept = (mixed == x).float().mean(dim=(1, 2, 3))
        moved = targets.y_a != targets.y_b
        assert torch.allclose(kept[moved], torch.full_like(kept[moved], targets.lam), atol=1e-6)


def test_mixing_draws_are_reproducible_and_depend_on_batch():
    x, y = _batch()
    a = mix_batch(x, y, 0.2, 1.0, batch_rng(3, 2, 5, 0))
    b = mix_batch(x, y, 0.2, 1.0, batch_rng(3, 2, 5, 0))
    c = mix_batch(x, y, 0.2, 1.0, batch_rng(3, 2, 6, 0))
    assert torch.equal(a[0], b[0]) and a[1].lam == b[1].lam
    assert not torch.equal(a[0], c[0]) or a[1].lam != c[1].lam


def test_random_erasing_zeroes_one_rectangle_per_chosen_image():
    x = torch.ones(64, 3, 20, 20)
    erased = random_erase(x, 1.0, np.random.default_rng(0))
    zero = (erased == 0).all(dim=1)  # (n, h, w): erased pixels are zero in every channel
    for mask in zero:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(mask.sum()) == int(box)  # one solid rectangle
        assert 0.02 * 400 * 0.5 <= int(mask.sum()) <= 400 / 3 * 1.5
    assert torch.equal(random_erase(x, 0.0, np.random.default_rng(0)), x)


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    values = [lr_at(step, 100, 0, 0.1, "step") for step in (0, 49, 50, 74, 75, 99)]
    assert values == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_distillation_loss_is_zero_for_identical_distributions_and_positive_otherwise():
    logits = torch.randn(5, 4)
    soft = torch.softmax(logits / 3.0, dim=1)
    assert float(distillation_loss(logits, soft, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(torch.zeros(5, 4), soft, 3.0)) > 0


def test_drop_path_option_reaches_the_model():
    model = create_model("resnet20", drop_path_rate=0.2)
    rates = [m.rate for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_drop_path_on_a_model_without_it_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="has no stochastic depth"):
        fit(TrainConfig(data=TINY_SYNTH, epochs=1, batch_size=8, drop_path=0.1, out=str(tmp_path / "r")), quiet=True)


REGULARISED = dict(data=TINY_SYNTH, epochs=2, batch_size=8, threads=1, mixup_alpha=0.4, cutmix_alpha=1.0,
                   random_erasing=0.5, label_smoothing=0.1, augment="crop-flip")


def test_mixing_runs_resume_bit_exactly(tmp_path):
    full = fit(TrainConfig(**REGULARISED, out=str(tmp_path / "full")), quiet=True)
    assert full["status"] == "completed"

    def stop_after_first(epoch: int, record: dict) -> None:
        if epoch == 1:
            raise TrainingInterrupted(130)

    with pytest.raises(TrainingInterrupted):
        fit(TrainConfig(**REGULARISED, out=str(tmp_path / "split")), on_epoch_end=stop_after_first, quiet=True)
    fit(TrainConfig(resume=str(tmp_path / "split")), quiet=True)
    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "split" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_from_a_checkpoint_teacher(tmp_path):
    teacher_run = tmp_path / "teacher"
    fit(TrainConfig(data=TINY_SYNTH, epochs=3, batch_size=8, threads=1, out=str(teacher_run)), quiet=True)
    student = TrainConfig(data=TINY_SYNTH, epochs=2, batch_size=8, threads=1, teachers=[str(teacher_run)],
                          kd_alpha=1.0, kd_temperature=2.0, out=str(tmp_path / "student"))
    summary = fit(student, quiet=True)
    assert summary["test_top1"] > 60  # 3 classes: learned from soft targets alone
    saved = json.loads((tmp_path / "student" / "last.json").read_text())
    assert saved["recipe"]["teachers"] == [str(teacher_run)] and saved["recipe"]["kd_alpha"] == 1.0
    # two teachers (the same one twice) and consistent teaching also run
    twice = TrainConfig(data=TINY_SYNTH, epochs=1, batch_size=8, threads=1, teachers=[str(teacher_run)] * 2,
                        kd_consistent=True, augment="flip", out=str(tmp_path / "student2"))
    assert fit(twice, quiet=True)["status"] == "completed"


def test_teacher_with_other_classes_is_refused(tmp_path):
    teacher_run = tmp_path / "teacher"
    fit(TrainConfig(data="synthetic:classes=4,size=8,train=32,test=16", epochs=1, batch_size=8,
                      out=str(teacher_run)), quiet=True)
    with pytest.raises(ConfigError, match="predicts 4 classes, the data has 3"):
        fit(TrainConfig(data=TINY_SYNTH, epochs=1, batch_size=8, teachers=[str(teacher_run)],
                          out=str(tmp_path / "s")), quiet=True)


@pytest.mark.shared
def test_foreign_teacher_from_reference_weights(tmp_path):
    weights = SHARED / "reference-weights" / "resnet20-12fca82f.th"
    if not weights.is_file():
        pytest.skip(f"{weights} not found")
    result = run_cli("train", "--data", "synthetic:classes=10,size=32,train=64,test=32", "--epochs", "1",
                     "--batch-size", "16", "--teacher-model", "resnet20", "--teacher-weights", weights,
                     "--teacher-mean", "0.485", "0.456", "0.406", "--teacher-std", "0.229", "0.224", "0.225",
                     "--out", tmp_path / "run", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "teacher_model: resnet20" in config and "0.485" in config


def test_shipped_recipes_are_valid_and_cite_sources():
    names = [r["name"] for r in list_recipes()]
    assert {"mnist-fast", "cifar-fast", "cifar-resnet", "imagenet-resnet50"} <= set(names)
    for item in list_recipes():
        assert item["source"] and item["description"]
        config = apply_recipe(TrainConfig(recipe=item["name"]))
        config.validate()
        create_model(config.model, **config.model_args)  # the model and its arguments exist


def test_recipe_fills_defaults_and_explicit_options_win():
    config = apply_recipe(TrainConfig(recipe="cifar-resnet", epochs=3))
    assert config.epochs == 3 and config.schedule == "step" and config.weight_decay == 0.0001
    # an explicit value equal to the default still wins over the recipe
    config = recipe_config("mnist-fast", amp=False, data=TINY_SYNTH)
    assert config.amp is False and config.channels_last is True and config.recipe == "mnist-fast"
    assert apply_recipe(config).amp is False  # applying twice changes nothing
    with pytest.raises(ConfigError, match="unknown recipe 'cifar-fats'.*cifar-fast"):
        apply_recipe(TrainConfig(recipe="cifar-fats"))


def test_recipes_cli_and_training_with_a_recipe(tmp_path):
    listing = run_cli("recipes", "--json", cwd=tmp_path)
    assert listing.returncode == 0
    assert "mnist-fast" in {r["name"] for r in json.loads(listing.stdout)["recipes"]}
    result = run_cli("train", "--recipe", "mnist-fast", "--data", TINY_SYNTH, "--epochs", "1", "--batch-size", "8",
                     "--no-amp", "--out", tmp_path / "run", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "label_smoothing: 0.1" in config and "stem_pool: true" in config and "epochs: 1" in config
    assert load_checkpoint(Path(tmp_path / "run")).meta["recipe"]["recipe"] == "mnist-fast"
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["epoch"] == 1
