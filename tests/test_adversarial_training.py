"""Adversarial training on the engine (--adv-train pgd|fgsm-rs|trades): settings, the attack, the loss, the result."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge import TrainConfig, fit
from convforge.cli import main
from convforge.errors import ConfigError
from convforge.measure.attacks import NormalizedClassifier, pgd
from convforge.train.adversarial import (ADV_DEFAULTS, Adversary, TradesTargets, attack_generator,
                                         resolve_adversarial)
from convforge.train.inference import load_model
from helpers import read_jsonl

DATA = "synthetic:classes=4,size=8,train=256,test=64"
MEAN = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
STD = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(16, 3, 8, 8, generator=generator)
    return (pixels - MEAN) / STD, torch.randint(0, 4, (16,), generator=generator)


@pytest.mark.parametrize("method", ["pgd", "fgsm-rs", "trades"])
def test_defaults_are_the_papers_and_the_step_scales_with_eps(method):
    cfg = resolve_adversarial(TrainConfig(adv_train=method))
    eps, steps, step, beta = ADV_DEFAULTS[method]
    assert (cfg.adv_eps, cfg.adv_steps, cfg.adv_step_size, cfg.adv_beta) == (eps, steps, step, beta)
    assert cfg.adv_eval_samples == 1000
    wider = resolve_adversarial(TrainConfig(adv_train=method, adv_eps=16 / 255))
    assert wider.adv_step_size == pytest.approx(2 * step)
    assert ADV_DEFAULTS["fgsm-rs"][2] == pytest.approx(1.25 * 8 / 255)  # Wong et al.: alpha = 1.25 eps


@pytest.mark.parametrize("values, message", [
    ({"adv_train": "pgd2"}, "adv_train must be one of pgd, fgsm-rs, trades"),
    ({"adv_train": "pgd", "adv_eps": 8.0}, "write 8/255"),
    ({"adv_eps": 0.03}, "add --adv-train"),
    ({"adv_train": "pgd", "adv_beta": 6.0}, "with --adv-train trades"),
    ({"adv_train": "trades", "adv_beta": -1.0}, "with --adv-train trades"),
    ({"adv_train": "fgsm-rs", "adv_steps": 3}, "fgsm-rs takes one step"),
    ({"adv_train": "pgd", "mixup_alpha": 0.2}, "cannot be combined with mixup_alpha"),
    ({"adv_train": "pgd", "task": "segment", "model": "unet", "data": "synthetic"}, "classification only"),
])
def test_bad_settings_are_clear_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values).validate()


def test_cli_reads_fractions(tmp_path, capsys):
    code = main(["train", "--data", DATA, "--epochs", "1", "--adv-train", "pgd", "--adv-eps", "4/255",
                 "--adv-steps", "2", "--adv-eval-samples", "8", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recipe = json.loads((tmp_path / "run" / "best.json").read_text())["recipe"]
    assert recipe["adv_eps"] == pytest.approx(4 / 255) and recipe["adv_step_size"] == pytest.approx(1 / 255)
    assert "test_pgd_top1" in summary
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects it before anything runs
        main(["train", "--data", DATA, "--adv-train", "pgd", "--adv-eps", "8/0"])
    assert exit_info.value.code == 2
    assert "not a perturbation size: '8/0' (write e.g. 8/255" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["pgd", "fgsm-rs", "trades"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_examples_stay_in_the_ball_and_on_the_pixel_range(method, channels_last):
    x, y = _batch()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eps, steps, step, beta = ADV_DEFAULTS[method]
    adversary = Adversary(method, eps, steps, step, beta, MEAN, STD)
    model = _net().train()
    adv = adversary.perturb(model, x, y, attack_generator(0, 0, 0, 0, x.device))
    assert adv.shape == x.shape and adv.is_contiguous(memory_format=torch.channels_last) == channels_last
    clean_pixels, adv_pixels = x * STD + MEAN, adv * STD + MEAN
    assert (adv_pixels - clean_pixels).abs().max() <= eps + 1e-5
    assert adv_pixels.min() >= -1e-5 and adv_pixels.max() <= 1 + 1e-5
    assert (adv_pixels - clean_pixels).abs().max() > eps / 2  # it moved
    assert model.training  # the mode is restored (trades attacks in eval mode)


def test_the_attack_raises_the_loss_and_is_seeded():
    x, y = _batch()
    model = _net().eval()
    adversary = Adversary("pgd", 8 / 255, 7, 2 / 255, 0.0, MEAN, STD)
    first = adversary.perturb(model, x, y, attack_generator(3, 1, 2, 0, x.device))
    again = adversary.perturb(model, x, y, attack_generator(3, 1, 2, 0, x.device))
    other = adversary.perturb(model, x, y, attack_generator(3, 1, 3, 0, x.device))
    assert torch.equal(first, again) and not torch.equal(first, other)
    with torch.no_grad():
        assert F.cross_entropy(model(first), y) > F.cross_entropy(model(x), y)


def test_trades_attack_leaves_batchnorm_statistics_alone_and_its_loss_is_ce_plus_beta_kl():
    x, y = _batch()
    model = _net().train()
    before = model[1].running_mean.clone()
    adversary = Adversary("trades", 8 / 255, 10, 2 / 255, 6.0, MEAN, STD)
    adv = adversary.perturb(model, x, y, attack_generator(0, 0, 0, 0, x.device))
    assert torch.equal(model[1].running_mean, before)  # generated in eval mode, as TRADES's code does
    target = TradesTargets(y, x, 6.0, model)
    adv_logits = model(adv)
    loss = target.loss(adv_logits, 0.0)
    clean_logits = model(x)
    p_clean = F.softmax(clean_logits, 1)
    kl = (p_clean * (F.log_softmax(clean_logits, 1) - F.log_softmax(adv_logits, 1))).sum(1).mean()
    assert loss.item() == pytest.approx((F.cross_entropy(clean_logits, y) + 6.0 * kl).item(), rel=1e-5)


def _pgd_accuracy(checkpoint, eps: float) -> float:
    loaded = load_model(checkpoint)
    from convforge.data import load

    test = load("digits").test
    model = NormalizedClassifier(loaded.model.eval(), loaded.mean, loaded.std)
    x, y = test.images.float() / 255, test.labels
    adv = pgd(model, x, y, eps, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model(adv).argmax(1) == y).float().mean())


@pytest.mark.slow
def test_adversarial_training_makes_a_model_robust_that_normal_training_does_not(tmp_path):
    common = dict(data="digits", epochs=6, batch_size=64, seed=0, model_args={"widths": [16, 32, 64]})
    fit(TrainConfig(out=str(tmp_path / "normal"), **common), quiet=True)
    summary = fit(TrainConfig(out=str(tmp_path / "robust"), adv_train="pgd", adv_eps=32 / 255, adv_steps=3,
                              adv_eval_samples=200, **common), quiet=True)
    assert summary["best_metric"] == "test_pgd10_top1"  # early stopping on robust accuracy
    eps = 32 / 255
    normal, robust = _pgd_accuracy(tmp_path / "normal", eps), _pgd_accuracy(tmp_path / "robust", eps)
    assert robust > normal + 0.25, (normal, robust)
    records = read_jsonl(tmp_path / "robust" / "metrics.jsonl")
    assert all("test_pgd10_top1" in r for r in records)
    assert records[-1]["test_pgd10_top1"] > records[0]["test_pgd10_top1"]
    config = (tmp_path / "robust" / "config.yaml").read_text()
    assert "adv_train: pgd" in config and "adv_steps: 3" in config
