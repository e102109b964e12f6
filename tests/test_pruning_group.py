"""Group pruning (DepGraph's "Group" method): group importance over every coupled layer, global ranking, the
group regulariser, Taylor importance, and pruned checkpoints fine-tuned through ``convforge train --init``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.compress import prune
from convforge.compress.graph import build_graph
from convforge.compress.importance import group_scores, loss_gradients
from convforge.compress.pipeline import prune_checkpoint
from convforge.compress.regularize import GroupRegularizer
from convforge.errors import ConfigError
from convforge.measure import count_macs
from convforge.models import create_model
from convforge.train import load_checkpoint
from convforge.train.checkpoint import save_checkpoint

SIZE = (3, 8, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class TwoConvResidual(nn.Module):
    """stem -> [conv1 -> conv2] + identity -> linear: group A (4 channels: stem out, bn0, conv1 in, conv2 out,
    bn2, fc in) is coupled by the addition; group B (6 channels: conv1 out, bn1, conv2 in) is internal."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn0(self.stem(x)))
        z = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(y)))))
        return self.fc(F.relu(y + z).mean((2, 3)))


def _model(seed: int = 0) -> TwoConvResidual:
    torch.manual_seed(seed)
    model = TwoConvResidual()
    gen = torch.Generator().manual_seed(seed + 1)
    for bn in (model.bn0, model.bn1, model.bn2):
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=gen) + 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return model.eval()


def _by_hand(m: TwoConvResidual, grads: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean over the coupled slices of sum(w^2) (or sum |w * grad|), for groups A and B."""
    def local(name: str, w: torch.Tensor, dim: int) -> torch.Tensor:
        w = w.detach().double()
        v = w.square() if grads is None else (w * grads[name].double()).abs()
        return v.transpose(0, dim).reshape(v.shape[dim], -1).sum(1)

    a = [local("stem.weight", m.stem.weight, 0), local("bn0.weight", m.bn0.weight, 0),
         local("conv1.weight", m.conv1.weight, 1), local("conv2.weight", m.conv2.weight, 0),
         local("bn2.weight", m.bn2.weight, 0), local("fc.weight", m.fc.weight, 1)]
    b = [local("conv1.weight", m.conv1.weight, 0), local("bn1.weight", m.bn1.weight, 0),
         local("conv2.weight", m.conv2.weight, 1)]
    return torch.stack(a).mean(0).double(), torch.stack(b).mean(0).double()


def _scores_of(model: nn.Module, normalizer: str, grads=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's group scores in channel order of stem (group A) and conv1 (group B)."""
    g = build_graph(model, SIZE)
    scores = group_scores(model, g, g.dependency_groups(), normalizer, grads)
    a = torch.tensor([scores[g.uf.find(i)] for i in g.params[("stem.weight", 0)]], dtype=torch.float64)
    b = torch.tensor([scores[g.uf.find(i)] for i in g.params[("conv1.weight", 0)]], dtype=torch.float64)
    return a, b


def test_group_importance_aggregates_every_coupled_layer():
    model = _model()
    g = build_graph(model, SIZE)
    assert sorted(len(group) for group in g.dependency_groups()) == [4, 6]
    a, b = _by_hand(model)
    got_a, got_b = _scores_of(model, "mean")
    assert torch.allclose(got_a, a / a.mean(), rtol=1e-9) and torch.allclose(got_b, b / b.mean(), rtol=1e-9)
    got_a, got_b = _scores_of(model, "max")
    assert torch.allclose(got_a, a / a.max(), rtol=1e-9) and torch.allclose(got_b, b / b.max(), rtol=1e-9)


def test_group_l2_keeps_what_the_whole_group_says_not_the_producing_filter():
    """Channel j of group B has the largest conv1 filter but an almost-zero conv2 input slice and BN scale:
    l2-filter keeps it, group-l2 (which also reads the consumer and the BN) removes it."""
    model = _model()
    j = int(model.conv1.weight.detach().flatten(1).norm(dim=1).argmax())
    with torch.no_grad():
        model.conv1.weight[j] *= 1.5
        model.conv2.weight[:, j] *= 1e-3
        model.bn1.weight[j] = 1e-3

    def kept_conv1_filters(method: str) -> set[int]:
        pruned = prune(model, SIZE, method, sparsity=0.5).model
        kept = set(pruned.bn1.running_var.tolist())  # distinct random values name the surviving channels
        return {k for k in range(6) if float(model.bn1.running_var[k]) in kept}

    _, b = _by_hand(model)
    assert kept_conv1_filters("group-l2") == set(b.argsort(descending=True)[:3].tolist())
    assert j not in kept_conv1_filters("group-l2") and j in kept_conv1_filters("l2-filter")


def test_global_ranking_removes_the_lowest_normalised_scores_across_groups():
    model = _model(3)
    a, b = _by_hand(model)
    a, b = a / a.max(), b / b.max()
    every = sorted([(float(v), "A", k) for k, v in enumerate(a)] + [(float(v), "B", k) for k, v in enumerate(b)])
    removed = every[:3]  # 30% of 10 channels; no group reaches its one-channel floor
    pruned = prune(model, SIZE, "group-l2", sparsity=0.3, global_ranking=True, normalizer="max").model
    assert pruned.stem.out_channels == 4 - sum(1 for _, grp, _ in removed if grp == "A")
    assert pruned.conv1.out_channels == 6 - sum(1 for _, grp, _ in removed if grp == "B")
    x = torch.randn(2, *SIZE)
    same = prune(model, SIZE, "group-l2", sparsity=0.0, global_ranking=True).model.eval()
    assert torch.equal(same(x), model(x))


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2 (depthwise, inverted residual)"])
def test_group_methods_honour_the_mac_target_and_change_nothing_at_full_keep(name):
    from convforge.models.mobilenet_v2 import MobileNetV2

    torch.manual_seed(0)
    model = (create_model("resnet20", num_classes=10) if name == "resnet20" else
             MobileNetV2(num_classes=10, width_mult=0.25)).eval()
    size = (3, 16, 16)
    x = torch.randn(2, *size)
    macs = count_macs(model, size)
    for kwargs in ({}, {"global_ranking": True, "normalizer": "max"}, {"global_ranking": True, "round_to": 8}):
        result = prune(model, size, "group-l2", target_macs=0.5, **kwargs)
        assert count_macs(result.model, size) == result.macs_after <= 0.5 * macs
        assert result.macs_after >= (0.40 if kwargs.get("round_to") else 0.475) * macs
        assert result.model.eval()(x).shape == (2, 10)
        full = prune(model, size, "group-l2", target_macs=1.0, **kwargs).model.eval()
        assert torch.equal(full(x), model(x))


def test_taylor_importance_is_the_group_mean_of_weight_times_gradient():
    model = _model(5)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, *SIZE, generator=gen), torch.randint(0, 5, (6,), generator=gen)) for _ in range(2)]
    grads = loss_gradients(model, batches)
    # independent gradients: one summed loss over both batches, divided by the image count
    check = _model(5)
    loss = sum(F.cross_entropy(check(x), y, reduction="sum") for x, y in batches) / 12
    loss.backward()
    assert torch.allclose(grads["conv1.weight"], check.conv1.weight.grad, atol=1e-6)
    assert model.conv1.weight.grad is None and torch.equal(model.bn1.running_var, check.bn1.running_var)
    a, b = _by_hand(model, grads)
    got_a, got_b = _scores_of(model, "mean", grads)
    assert torch.allclose(got_a, a / a.mean(), rtol=1e-6) and torch.allclose(got_b, b / b.mean(), rtol=1e-6)
    with pytest.raises(ConfigError, match="taylor needs gradients"):
        prune(model, SIZE, "taylor", sparsity=0.5)


def test_regulariser_gradient_is_reg_times_gamma_times_w():
    model = _model(7)
    reg, alpha = 1e-2, 4.0
    regularizer = GroupRegularizer(model, SIZE, reg, alpha)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    regularizer.attach(model, optimizer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the pre-step hook adds the regularisation gradient
    a, b = _by_hand(model)

    def gamma(values: torch.Tensor) -> torch.Tensor:
        imp = values.sqrt()
        return 2 ** (alpha * (imp.max() - imp) / (imp.max() - imp.min()))

    assert torch.allclose(model.bn1.weight.grad.double(), reg * gamma(b) * model.bn1.weight.detach().double(),
                          rtol=1e-5)
    # conv2 sits in both groups: its outputs belong to A, its inputs to B, and each adds its term
    scale = gamma(a).view(-1, 1, 1, 1) + gamma(b).view(1, -1, 1, 1)
    expected = (reg * scale * model.conv2.weight.detach().double()).float()
    assert torch.allclose(model.conv2.weight.grad, expected, rtol=1e-5)
    assert torch.equal(model.fc.bias.grad, torch.zeros_like(model.fc.bias))  # biases are not regularised
    regularizer.close(None)
    optimizer.step()
    assert torch.allclose(model.conv2.weight.grad, expected, rtol=1e-5)  # detached: nothing added any more


def test_regulariser_shrinks_the_least_important_channels_much_more():
    """Train the same model on the same batch with and without the regulariser; compare channel norms."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, *SIZE, generator=gen), torch.randint(0, 5, (32,), generator=gen)

    def train(regularise: bool) -> TwoConvResidual:
        model = _model(11).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if regularise:
            GroupRegularizer(model, SIZE, reg=5e-3, alpha=4.0).attach(model, optimizer)
        for _ in range(40):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return model.eval()

    before, plain, sparse = _by_hand(_model(11)), _by_hand(train(False)), _by_hand(train(True))
    for start, without, with_reg in zip(before, plain, sparse):
        ratio = (with_reg / without).sqrt()  # channel norm with / without the regulariser
        low, high = int(start.argmin()), int(start.argmax())
        assert ratio[low] < 0.3  # gamma = 16 at the start
        assert ratio[high] > 0.75  # gamma = 1
        assert ratio[low] < ratio.min() + 1e-12


def _resnet_checkpoint(tmp_path, classes=10, size=(3, 8, 8)):
    torch.manual_seed(0)
    meta = {"model": {"name": "resnet20", "args": {"shortcut": "B"}, "num_classes": classes, "in_chans": 3},
            "classes": [str(i) for i in range(classes)], "input_size": list(size),
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    model = create_model("resnet20", num_classes=classes, shortcut="B")
    return save_checkpoint(tmp_path / "resnet20.safetensors", model.eval(), meta)


def test_pipeline_regularises_then_prunes_and_the_checkpoint_fine_tunes_through_train_init(digits_run, tmp_path,
                                                                                        capsys):
    from convforge.cli import main

    out = tmp_path / "pruned.safetensors"
    report = prune_checkpoint(digits_run["run_dir"], "group-l2", target_macs=0.5, global_ranking=True,
                              normalizer="max", sparsity_epochs=1, sparsity_reg=1e-3, batch_size=64, threads=1,
                              out=out, quiet=True, log=lambda _m: None)
    sparse_run = tmp_path / "pruned.finetune" / "sparsity"
    assert json.loads((sparse_run / "summary.json").read_text())["epochs"] == 1
    assert report["sparsity_training"]["reg"] == 1e-3 and "top1_regularized" in report
    assert report["macs_ratio"] <= 0.5 and load_checkpoint(out).meta["compress"]["global_ranking"] is True
    pruned = load_checkpoint(out).model
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    run = tmp_path / "tuned"
    code = main(["train", "--init", str(out), "--recipe", "cifar-prune-finetune", "--data", "digits", "--epochs", "2",
                 "--batch-size", "64", "--threads", "1", "--out", str(run), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    tuned = load_checkpoint(run / "last.safetensors").model
    assert {k: tuple(v.shape) for k, v in tuned.state_dict().items()} == shapes  # the pruned widths, rebuilt
    assert summary["test_top1"] > report["history"][-1]["top1_pruned"] + 20  # it trains from the pruned weights
    config = (run / "config.yaml").read_text()
    assert "schedule: cosine" in config and "optimizer: sgd" in config and "nesterov: true" in config


def test_cli_prune_takes_the_group_options(tmp_path, capsys):
    from convforge.cli import main

    path = _resnet_checkpoint(tmp_path)
    code = main(["prune", str(path), "--method", "group-l2", "--target-macs", "0.5", "--global-pruning",
                 "--normalizer", "max", "--round-to", "8", "--dry-run", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    widths = [row["out"][1] for row in report["plan"] if row["kind"] == "conv"]
    assert report["macs_ratio"] <= 0.5 and all(w % 8 == 0 for w in widths)
    assert len(set(widths)) > 2  # global ranking: stages lose different shares
    assert main(["prune", str(path), "--method", "taylor", "--target-macs", "0.5", "--dry-run"]) == 2
    assert "pass --data" in capsys.readouterr().err


def test_iterative_group_pruning_reaches_the_mac_target_in_steps(tmp_path):
    path = _resnet_checkpoint(tmp_path)
    report = prune_checkpoint(path, "group-l2", target_macs=0.5, steps=3, global_ranking=True, round_to=1,
                              evaluate_split=None, out=tmp_path / "k3.safetensors", log=lambda _m: None)
    macs = [entry["macs"] for entry in report["history"]]
    assert len(macs) == 3 and macs[0] > macs[1] > macs[2] == report["macs_after"]
    assert 0.475 <= report["macs_ratio"] <= 0.5
    # each step prunes a third of the way from the full model to the target
    for k, value in enumerate(macs, start=1):
        assert value <= (1 - 0.5 * k / 3) * report["macs_before"]
        assert value >= (1 - 0.5 * k / 3) * report["macs_before"] * 0.95


def test_taylor_pruning_reads_training_images_of_the_data(digits_run, tmp_path):
    kwargs = {"target_macs": 0.6, "data": "digits", "evaluate_split": None, "log": lambda _m: None}
    plan = prune_checkpoint(digits_run["run_dir"], "taylor", dry_run=True, **kwargs)["plan"]
    report = prune_checkpoint(digits_run["run_dir"], "taylor", out=tmp_path / "taylor.safetensors", **kwargs)
    assert report["macs_ratio"] <= 0.6 and report["plan"] == plan  # same seeded images: same ranking
