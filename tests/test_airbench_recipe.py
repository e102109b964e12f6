"""airbench94's training pieces on the engine: triangle schedule, norm learning-rate scale, Lookahead,
alternating flips, reflect-padded crops, shifted-view TTA, SpeedNet's airbench BatchNorms and init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convforge import TrainConfig, fit
from convforge.data.loader import BatchLoader, alternating_flips, random_crop
from convforge.data.dataset import Split
from convforge.errors import ConfigError
from convforge.models import create_model
from convforge.recipes import recipe_config
from convforge.train import load_checkpoint
from convforge.train.ema import Lookahead
from convforge.train.evaluate import predict_logits
from convforge.train.optim import lr_at, param_groups


def test_triangle_schedule_matches_its_definition():
    total, warmup, peak = 1000, 230, 2.0
    assert lr_at(0, total, warmup, peak, "triangle") == pytest.approx(0.4)  # 0.2 x peak
    assert lr_at(115, total, warmup, peak, "triangle") == pytest.approx(2.0 * (0.2 + 0.8 * 0.5))
    assert lr_at(230, total, warmup, peak, "triangle") == pytest.approx(2.0)
    assert lr_at(1000, total, warmup, peak, "triangle") == pytest.approx(0.14)  # 0.07 x peak at the end
    middle = 230 + (1000 - 230) // 2
    assert lr_at(middle, total, warmup, peak, "triangle") == pytest.approx(2.0 * (1 - 0.93 * 385 / 770))


def test_triangle_warm_up_defaults_to_23_percent_of_the_epochs():
    cfg = TrainConfig(schedule="triangle", epochs=10).resolved(3, (32, 32), "crop-flip")
    assert cfg.warmup_epochs == pytest.approx(2.3)
    assert TrainConfig(epochs=10).resolved(3, (32, 32), "crop-flip").warmup_epochs == pytest.approx(1.5)


def test_norm_lr_scale_keeps_the_decay_per_step_and_decay_all_covers_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    groups = param_groups(model, 0.01, norm_lr_scale=64.0, decay_all=True)
    by_id = {id(p): g for g in groups for p in g["params"]}
    norm = by_id[id(model[1].weight)]
    assert norm is by_id[id(model[1].bias)] and norm["lr_scale"] == 64.0
    assert norm["lr_scale"] * norm["weight_decay"] == pytest.approx(0.01)  # lr x wd per step unchanged
    assert by_id[id(model[0].bias)]["weight_decay"] == 0.01 and by_id[id(model[0].weight)]["weight_decay"] == 0.01
    plain = param_groups(model, 0.01)
    assert len(plain) == 2 and id(model[0].bias) in {id(p) for p in plain[1]["params"]}  # no decay on biases


def test_engine_applies_each_groups_lr_scale(tmp_path):
    """With lr scale 64 on the norm parameters and the constant schedule, the BatchNorm shift moves 64x further
    in the first SGD step (no momentum history yet) than the same run without the scale."""
    shifts = {}
    for scale in (1.0, 64.0):
        cfg = TrainConfig(model="smallcnn", data="synthetic:classes=2,size=8,train=32,test=8", epochs=1,
                          batch_size=32, lr=1e-3, momentum=0.0, weight_decay=0.0, schedule="constant",
                          warmup_epochs=0, threads=1, norm_lr_scale=scale, out=str(tmp_path / str(scale)))
        fit(cfg, quiet=True)
        end = load_checkpoint(tmp_path / str(scale) / "last.safetensors").model
        first_norm = next(m for m in end.modules() if isinstance(m, nn.BatchNorm2d))
        shifts[scale] = first_norm.bias.detach().abs().sum()  # BatchNorm shifts start at 0; one step of 32 images
    assert float(shifts[64.0] / shifts[1.0]) == pytest.approx(64.0, rel=1e-3)


def test_reflect_crop_equals_pad_then_crop():
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).view(2, 3, 6, 5)
    offsets = torch.tensor([[0, 4], [3, 1]])
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    expected = torch.stack([padded[i, :, r:r + 6, c:c + 5] for i, (r, c) in enumerate(offsets.tolist())])
    assert torch.equal(random_crop(x, 2, offsets, "reflect"), expected)
    assert torch.equal(random_crop(x.to(torch.uint8), 2, offsets, "reflect"), expected.to(torch.uint8))


def test_alternating_flips_show_every_image_both_ways_in_each_pair_of_epochs():
    even, odd = alternating_flips(1000, seed=3, epoch=4), alternating_flips(1000, seed=3, epoch=5)
    assert torch.equal(even, ~odd) and torch.equal(even, alternating_flips(1000, seed=3, epoch=0))
    assert 400 < int(even.sum()) < 600 and not torch.equal(even, alternating_flips(1000, seed=4, epoch=0))
    images = torch.arange(8 * 3 * 4 * 4, dtype=torch.uint8).view(8, 3, 4, 4)
    split = Split(images=images, labels=torch.zeros(8, dtype=torch.long))
    loader = BatchLoader(split, 8, (0.0,) * 3, (1 / 255,) * 3, augment="crop-altflip", crop_padding=0, seed=3)
    seen = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        x, _ = next(iter(loader))
        seen.append(x)
    assert torch.equal(seen[0], seen[1].flip(3))  # the same images, mirrored the other way in the next epoch


def test_lookahead_follows_airbench_schedule_and_ends_on_the_slow_weights():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    slow = {k: v.clone() for k, v in model.state_dict().items()}
    lookahead = Lookahead(model, total_steps=12, every=5)
    for t in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # an optimizer step
        fast = {k: v.clone() for k, v in model.state_dict().items()}
        lookahead.update(model)
        if t % 5 == 0 or t == 12:
            decay = 1.0 if t == 12 else 0.95 ** 5 * (t / 12) ** 3
            slow = {k: slow[k] * decay + (1 - decay) * fast[k] for k in slow}
            expected = slow  # synced: the weights are set to the slow copy
        else:
            expected = fast  # between syncs the weights are left alone
        for k, v in model.state_dict().items():
            assert torch.allclose(v, expected[k], atol=1e-6), (t, k)
    assert torch.allclose(lookahead.module.weight, slow["weight"], atol=1e-6)  # the saved weights


def test_shift_tta_averages_mirrored_shifted_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.LazyLinear(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)

    def mirrored(v):
        return 0.5 * (model(v) + model(v.flip(3)))

    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = 0.5 * mirrored(x) + 0.25 * (mirrored(padded[..., :8, :8]) + mirrored(padded[..., 2:, 2:]))
    assert torch.allclose(predict_logits(model, x, tta=True, tta_shift=1), expected, atol=1e-6)
    assert torch.allclose(predict_logits(model, x, tta=True), mirrored(x), atol=1e-6)


def test_speednet_airbench_norms_and_identity_init():
    model = create_model("speednet", num_classes=10, widths=[32, 64, 64], airbench=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(m.momentum == 0.4 and m.eps == 1e-12 for m in norms)
    conv = model.stages[1][0]  # 32 -> 64: the first 32 filters pass their input channel through
    expected = torch.zeros(32, 32, 3, 3)
    expected[torch.arange(32), torch.arange(32), 1, 1] = 1
    assert torch.equal(conv.weight[:32], expected) and conv.weight[32:].abs().sum() > 0


def test_recipe_resolves_and_rejects_ema_with_lookahead():
    cfg = recipe_config("cifar-airbench")
    assert cfg.lookahead and cfg.norm_lr_scale == 64 and cfg.model_args == {"airbench": True}
    cfg.validate()
    with pytest.raises(ConfigError, match="lookahead"):
        TrainConfig(ema=True, lookahead=True).validate()
    with pytest.raises(ConfigError, match="eval-tta"):
        TrainConfig(eval_tta_shift=1).validate()
