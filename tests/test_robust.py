"""Attacks and robust evaluation: FGSM/PGD bounds, monotone accuracy, AutoAttack's protocol, resume, CLI."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from convforge.cli import main
from convforge.data import load
from convforge.errors import ConfigError
from convforge.measure.attacks import NormalizedClassifier, fgsm, pgd
from convforge.measure.autoattack import (REFERENCE_COUNTS, STAGES, AutoAttackCounts, build_attacks,
                                          checked_adversarial, run_autoattack)
from convforge.robust import evaluate_robustness
from convforge.robust.corruption import corrupted_chunk, corruption_summary
from convforge.train.inference import load_model
from helpers import SHARED, save_image

# Small counts for speed where a test runs AutoAttack; the reference counts are checked separately.
FAST_AA = AutoAttackCounts(apgd_steps=10, apgdt_steps=10, apgdt_targets=3, fab_steps=10, fab_targets=3,
                           square_queries=100)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # two shared cores: one thread is many times faster than two under load


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A small CNN trained 3 epochs on scikit-learn digits (one thread: a few seconds)."""
    from convforge import TrainConfig, fit

    run = tmp_path_factory.mktemp("robust-digits") / "run"
    fit(TrainConfig(model="smallcnn", data="digits", epochs=3, batch_size=64, threads=1,
                    model_args={"widths": [16, 32, 64]}, out=str(run)), quiet=True)
    return run


@pytest.fixture
def loaded(digits_ckpt):
    return load_model(digits_ckpt)


@pytest.fixture
def batch(loaded, digits):
    model = NormalizedClassifier(loaded.model.float().eval(), loaded.mean, loaded.std).eval()
    return model, digits.test.images[:96].float() / 255, digits.test.labels[:96]


def _norms(x, adv, norm):
    delta = (adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_fgsm_and_pgd_stay_within_eps_and_pixel_range(batch, norm, eps):
    model, x, y = batch
    generator = torch.Generator().manual_seed(0)
    candidates = [pgd(model, x, y, eps, norm=norm, steps=7, restarts=2, generator=generator),
                  pgd(model, x, y, eps, norm=norm, steps=3, step_size=eps, generator=generator)]  # large steps
    candidates.append(fgsm(model, x, y, eps) if norm == "linf" else
                      pgd(model, x, y, eps, norm=norm, steps=1, step_size=eps, random_start=False))
    for adv in candidates:
        sizes = _norms(x, adv, norm)
        assert float(sizes.max()) <= eps + 1e-6
        assert float(sizes.max()) > 0.5 * eps  # the budget is used
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1


def test_checked_adversarial_repairs_rounding_and_rejects_violations():
    x = torch.full((2, 1, 4, 4), 0.5)
    nudged = x + 0.1 + 1e-7
    repaired = checked_adversarial(x, nudged, 0.1, "linf")
    assert float((repaired - x).abs().max()) <= 0.1 + 1e-7
    with pytest.raises(RuntimeError, match="outside the linf ball"):
        checked_adversarial(x, x + 0.2, 0.1, "linf")
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        checked_adversarial(x, x + 0.6, 1.0, "linf")
    with pytest.raises(RuntimeError, match="outside the l2 ball"):
        checked_adversarial(x, x + 0.1, 0.1, "l2")


def test_accuracy_falls_monotonically_with_eps_and_reaches_zero(loaded, digits):
    eps = ("8/255", "16/255", "32/255", "64/255", "0.5")
    result = evaluate_robustness(loaded, digits, attacks=("fgsm", "pgd"), eps=eps, samples=96, steps=10,
                                 batch_size=48, progress=False)
    rows = {(r["attack"], r["eps_text"]): r for r in result["results"]}
    assert result["clean"]["accuracy"] > 90 and result["clean"]["points"] == 96
    for attack in ("fgsm", "pgd"):
        accuracy = [result["clean"]["accuracy"]] + [rows[attack, e]["robust_accuracy"] for e in eps]
        assert accuracy == sorted(accuracy, reverse=True), (attack, accuracy)
        assert all(rows[attack, e]["points"] == 96 for e in eps)
    assert rows["pgd", "0.5"]["robust_accuracy"] == 0.0
    assert rows["pgd", "32/255"]["robust_accuracy"] < result["clean"]["accuracy"] - 20
    for e in eps:  # PGD is at least as strong as FGSM (two points of slack)
        assert rows["pgd", e]["robust"] <= rows["fgsm", e]["robust"] + 2


def test_more_steps_and_restarts_never_raise_robust_accuracy(loaded, digits, batch):
    common = dict(attacks=("pgd",), eps=("24/255",), samples=128, batch_size=64, progress=False)
    row = {}
    for steps, restarts in ((5, 1), (40, 1), (10, 1), (10, 3)):
        result = evaluate_robustness(loaded, digits, steps=steps, restarts=restarts, **common)
        row[steps, restarts] = result["results"][0]
    assert row[40, 1]["robust"] <= row[5, 1]["robust"] + 2
    assert row[10, 3]["robust"] <= row[10, 1]["robust"]
    model, x, y = batch  # per point: the first restart is the same draw, and a fooled point stays fooled
    fooled = {}
    for restarts in (1, 3):
        adv = pgd(model, x, y, 24 / 255, steps=10, restarts=restarts, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            fooled[restarts] = model(adv).argmax(1) != y
    assert bool((fooled[1] & ~fooled[3]).sum() == 0) and int(fooled[3].sum()) >= int(fooled[1].sum())
    print(f"\nPGD 24/255 on 128 digits: 5 steps {row[5, 1]['robust_accuracy']:.1f}%, 40 steps "
          f"{row[40, 1]['robust_accuracy']:.1f}%, 3 restarts {row[10, 3]['robust_accuracy']:.1f}%")


@pytest.mark.parametrize("norm,eps", [("linf", 24 / 255), ("l2", 1.0)])
def test_autoattack_is_at_least_as_strong_as_pgd_and_its_stages_nest(batch, norm, eps):
    model, x, y = batch
    x, y = x[:48], y[:48]
    result = run_autoattack(model, x, y, eps, norm=norm, n_classes=10, counts=FAST_AA, seed=0)
    assert [stage for stage, _ in result.robust] == list(STAGES)
    previous = result.clean
    for _, mask in result.robust:
        assert bool((mask & ~previous).sum() == 0)  # robust after a stage => robust before it
        previous = mask
    adv = pgd(model, x, y, eps, norm=norm, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pgd_robust = (model(adv).argmax(1) == y) & result.clean
        aa_pred = model(result.adversarial).argmax(1)
    assert int(result.final.sum()) <= int(pgd_robust.sum())
    assert torch.equal(aa_pred == y, result.final | (~result.clean & (aa_pred == y)))
    sizes = _norms(x, result.adversarial, norm)
    assert float(sizes.max()) <= eps + 1e-5 and 0 <= float(result.adversarial.min()) <= float(result.adversarial.max()) <= 1
    assert set(result.seconds) == set(STAGES)
    print(f"\n{norm} eps {eps:.3f}: clean {int(result.clean.sum())}/48, PGD-20 {int(pgd_robust.sum())}, "
          + ", ".join(f"{s} {int(m.sum())}" for s, m in result.robust))


def test_autoattack_rows_report_each_stage(loaded, digits):
    result = evaluate_robustness(loaded, digits, attacks=("pgd", "autoattack"), eps=("24/255",), samples=40,
                                 batch_size=40, progress=False, autoattack_counts=FAST_AA)
    pgd_row, aa_row = result["results"]
    stages = [s["robust_accuracy"] for s in aa_row["stages"]]
    assert [s["stage"] for s in aa_row["stages"]] == list(STAGES)
    assert stages == sorted(stages, reverse=True) and stages[0] <= result["clean"]["accuracy"]
    assert aa_row["robust_accuracy"] == stages[-1] <= pgd_row["robust_accuracy"]
    assert aa_row["counts"]["apgd_steps"] == 10 and aa_row["points"] == pgd_row["points"] == 40


def test_autoattack_counts_are_the_reference_standard_version(batch):
    assert (REFERENCE_COUNTS.apgd_steps, REFERENCE_COUNTS.apgdt_targets, REFERENCE_COUNTS.fab_steps,
            REFERENCE_COUNTS.fab_targets, REFERENCE_COUNTS.square_queries) == (100, 9, 100, 9, 5000)
    model = batch[0]
    attacks = build_attacks(model, 8 / 255, "linf", 10)
    assert (attacks["apgd-ce"].steps, attacks["apgd-ce"].n_restarts, attacks["apgd-ce"].thr_decr) == (100, 1, 0.75)
    assert attacks["apgd-ce"].loss == "ce"
    assert (attacks["apgd-t"].steps, attacks["apgd-t"].n_target_classes, attacks["apgd-t"].n_restarts,
            attacks["apgd-t"].thr_decr) == (100, 9, 1, 0.75)
    fab = attacks["fab-t"]
    assert (fab.steps, fab.n_target_classes, fab.n_restarts, fab.multi_targeted) == (100, 9, 1, True)
    square = attacks["square"]
    assert (square.n_queries, square.p_init, square.n_restarts, square.rescale_schedule) == (5000, 0.8, 1, False)
    assert attacks["apgd-ce"].eps == pytest.approx(8 / 255) and attacks["square"].norm == "Linf"
    small, large = build_attacks(model, 0.5, "l2", 3), build_attacks(model, 0.5, "l2", 100)
    assert small["apgd-t"].n_target_classes == small["fab-t"].n_target_classes == 2
    assert large["apgd-t"].n_target_classes == large["fab-t"].n_target_classes == 9
    assert small["apgd-ce"].norm == "L2"


def test_missing_torchattacks_names_the_no_deps_install(batch, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps torchattacks==3\.5\.1.*torch"):
        build_attacks(batch[0], 8 / 255, "linf", 10)


def _comparable(result):
    return [{k: v for k, v in row.items() if k not in ("resumed_chunks", "seconds")} for row in result["results"]]


def test_resume_skips_finished_chunks_with_identical_results(loaded, digits, tmp_path, capsys):
    out = tmp_path / "out"
    args = dict(attacks=("fgsm", "pgd"), eps=("16/255", "32/255"), samples=64, steps=5, batch_size=16, out_dir=out)
    first = evaluate_robustness(loaded, digits, **args)
    assert first["resume"]["skipped_chunks"] == 0 and (out / "robust.json").exists()
    assert (out / "robust-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "robust.json").unlink()
    capsys.readouterr()
    again = evaluate_robustness(loaded, digits, **args)
    assert again["resume"]["skipped_chunks"] == 16  # 2 attacks x 2 eps x 4 chunks
    assert "skipped 16 chunks" in capsys.readouterr().err
    assert _comparable(again) == _comparable(first) and again["clean"] == first["clean"]
    assert json.loads((out / "robust.json").read_text())["results"] == again["results"]
    progress = json.loads((out / "robust-progress.json").read_text())  # as if stopped after the FGSM chunks
    progress["entries"] = {k: v for k, v in progress["entries"].items() if v["attack"] == "fgsm"}
    (out / "robust-progress.json").write_text(json.dumps(progress))
    partial = evaluate_robustness(loaded, digits, **args)
    assert partial["resume"]["skipped_chunks"] == 8 and _comparable(partial) == _comparable(first)
    steps = evaluate_robustness(loaded, digits, **{**args, "steps": 6})  # only the PGD chunks change
    assert steps["resume"]["skipped_chunks"] == 8
    fresh = evaluate_robustness(loaded, digits, **{**args, "seed": 1})
    assert fresh["resume"]["skipped_chunks"] == 0 and "starting afresh" in fresh["resume"]["note"]
    assert "seed" in fresh["resume"]["note"] and fresh["indices"] != first["indices"]


def test_clear_errors(loaded, digits):
    with pytest.raises(ConfigError, match="360 images"):
        evaluate_robustness(loaded, digits, samples=361, progress=False)
    with pytest.raises(ConfigError, match="fgsm, pgd, pgd-l2, autoattack"):
        evaluate_robustness(loaded, digits, attacks=("cw",), progress=False)
    for eps in ("0", "-1/255", "1.5"):
        with pytest.raises(ConfigError, match="8/255"):
            evaluate_robustness(loaded, digits, eps=(eps,), progress=False)
    with pytest.raises(ConfigError, match="classifiers"):
        evaluate_robustness(SimpleNamespace(task="segment", label="unet.safetensors"), digits)


def test_cli_robust_json_table_and_files(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "robust"
    code = main(["robust", str(digits_ckpt), "--data", "digits", "--samples", "64", "--attack", "fgsm,pgd",
                 "--eps", "2/255,8/255", "--out", str(out), "--json", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert [(r["attack"], r["eps_text"]) for r in report["results"]] == [
        ("fgsm", "2/255"), ("fgsm", "8/255"), ("pgd", "2/255"), ("pgd", "8/255")]
    assert all(r["points"] == 64 and 0 <= r["robust_accuracy"] <= report["clean"]["accuracy"] for r in report["results"])
    assert report["samples"] == 64 and report["seed"] == 0 and report["eps"] == [2 / 255, 8 / 255]
    assert json.loads((out / "robust.json").read_text())["results"] == report["results"]
    assert (out / "robust-curve.png").stat().st_size > 1000
    code = main(["robust", str(digits_ckpt), "--samples", "8", "--eps", "8/255", "--threads", "1"])
    table = capsys.readouterr().out
    assert code == 0 and "robust accuracy" in table and "pgd" in table and "8/255" in table


@pytest.mark.parametrize("flags,message", [(["--eps", "8"], "8/255"), (["--eps", "0"], "> 0"),
                                           (["--attack", "pgd,deepfool"], "choose from fgsm, pgd, pgd-l2, autoattack")])
def test_cli_robust_bad_arguments(digits_ckpt, capsys, flags, message):
    code = main(["robust", str(digits_ckpt), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "convforge robust: error" in err


def test_mce_arithmetic_on_a_hand_case():
    errors = {("a", 1): 10.0, ("a", 2): 30.0, ("b", 1): 50.0, ("b", 2): 50.0}
    baseline = {("a", 1): 20.0, ("a", 2): 60.0, ("b", 1): 25.0, ("b", 2): 25.0}
    summary = corruption_summary(errors, 5.0, baseline, 10.0)
    a, b = summary["per_corruption"]
    assert (a["corruption"], a["accuracy"], b["accuracy"]) == ("a", 80.0, 50.0) and summary["mean_accuracy"] == 65.0
    assert (a["ce"], b["ce"], summary["mce"]) == (50.0, 200.0, 125.0)  # 40/80, 100/50
    assert (a["relative_ce"], b["relative_ce"], summary["relative_mce"]) == (50.0, 300.0, 175.0)  # 30/60, 90/30
    itself = corruption_summary(errors, 5.0, errors, 5.0)
    assert itself["mce"] == itself["relative_mce"] == 100.0
    assert "mce" not in corruption_summary(errors, 5.0)


def test_corruptions_with_the_model_as_baseline_and_independent_of_batch_size(loaded, digits, tmp_path):
    args = dict(attacks=(), corruptions="gaussian_noise,glass_blur,snow,contrast", severities="1,5", samples=24,
                baseline=loaded, progress=False)
    small = evaluate_robustness(loaded, digits, batch_size=7, out_dir=tmp_path / "a", **args)
    whole = evaluate_robustness(loaded, digits, batch_size=24, **args)
    section = small["corruption"]
    assert small["results"] == [] and section["mce"] == 100.0 and section["relative_mce"] == 100.0
    assert [(r["corruption"], r["severity"]) for r in section["rows"]][:3] == [
        ("gaussian_noise", 1), ("gaussian_noise", 5), ("glass_blur", 1)]
    assert all(r["accuracy"] == r["baseline_accuracy"] for r in section["rows"])
    assert section["rows"] == [{**r, "seconds": a["seconds"]} for r, a in zip(whole["corruption"]["rows"],
                                                                               section["rows"])]
    assert min(r["accuracy"] for r in section["rows"]) < small["clean"]["accuracy"]  # corruptions do hurt
    assert (tmp_path / "a" / "robust-corruptions.png").read_bytes()[:4] == b"\x89PNG"
    images = digits.test.images[:10]
    one = corrupted_chunk(images, "snow", 3, 0, 0, "auto")
    parts = torch.cat([corrupted_chunk(images[:4], "snow", 3, 0, 0, "auto"),
                       corrupted_chunk(images[4:], "snow", 3, 0, 4, "auto")])
    assert torch.equal(one, parts) and one.shape == images.shape and one.dtype == torch.uint8
    again = evaluate_robustness(loaded, digits, batch_size=7, out_dir=tmp_path / "a", **args)
    assert again["resume"]["skipped_chunks"] == 4 * 2 * 4  # 4 corruptions x 2 severities x 4 chunks
    assert [dict(r, resumed_chunks=0) for r in again["corruption"]["rows"]] == section["rows"]


def test_cli_corruptions_with_baseline(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["robust", str(digits_ckpt), "--samples", "16", "--corruptions", "fog,contrast", "--severities",
                 "1-2", "--baseline", str(digits_ckpt), "--out", str(out), "--json", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    section = json.loads(captured.out)["corruption"]
    assert len(section["rows"]) == 4 and section["mce"] == 100.0 and section["severities"] == [1, 2]
    assert json.loads((out / "robust.json").read_text())["corruption"]["mce"] == 100.0
    assert (out / "robust-corruptions.png").exists() and not (out / "robust-curve.png").exists()
    code = main(["robust", str(digits_ckpt), "--samples", "4", "--baseline", str(digits_ckpt), "--threads", "1"])
    assert code == 2 and "--corruptions" in capsys.readouterr().err
    code = main(["robust", str(digits_ckpt), "--corruptions", "fogg", "--threads", "1"])
    assert code == 2 and "jpeg_compression" in capsys.readouterr().err


CIFAR_TAR = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
RESNET20 = SHARED / "reference-weights" / "resnet20-12fca82f.th"


@pytest.mark.shared
@pytest.mark.slow
def test_reference_resnet20_falls_to_pgd_at_8_over_255(tmp_path):
    """A non-robust model (ResNet-20, CIFAR-10) has almost no accuracy left under PGD-10 at 8/255."""
    if not CIFAR_TAR.exists() or not RESNET20.exists():
        pytest.skip(f"{CIFAR_TAR} or {RESNET20} is absent")
    files = {}
    with tarfile.open(CIFAR_TAR, "r|gz") as archive:
        for member in archive:
            if member.isfile() and member.name.startswith("cifar10-jpeg/test/"):
                files[member.name] = archive.extractfile(member).read()
    names = sorted(files)
    chosen = np.random.default_rng(0).choice(len(names), size=200, replace=False)
    for i in chosen:
        from PIL import Image

        parts = names[i].split("/")
        save_image(tmp_path / "cifar" / "test" / parts[-2] / parts[-1], np.asarray(Image.open(io.BytesIO(files[names[i]]))))
    data = load(f"imagefolder:{tmp_path / 'cifar'}")
    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = load_model(model="resnet20", weights=RESNET20, num_classes=10, classes=data.classes, image_size=32,
                       **imagenet)
    result = evaluate_robustness(model, data, attacks=("pgd",), eps=("8/255",), steps=10, batch_size=100,
                                 progress=False)
    print(f"\nResNet-20 on 200 CIFAR-10-JPEG test images: clean {result['clean']['accuracy']:.1f}%, "
          f"PGD-10 8/255 {result['results'][0]['robust_accuracy']:.1f}% ({result['timings']['total']:.1f} s)")
    assert result["samples"] == 200 and result["clean"]["accuracy"] >= 70
    assert result["results"][0]["robust_accuracy"] <= 2.0
