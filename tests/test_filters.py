"""convforge.inspect and `convforge filters`: metrics in closed form, agreement with torchconvquality,
distribution shift, the HDF5 filter database, pictures and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from convforge.cli import main
from convforge.errors import ConvforgeError
from convforge.inspect import (
    THRESHOLDS,
    FilterDB,
    distribution_shift,
    extract_filters,
    filter_health,
    layer_metrics,
    shift_matrix,
    weight_metrics,
)
from convforge.inspect.metrics import entropy_curve

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "reference-weights"
REFERENCE = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
             "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}
PNG = b"\x89PNG\r\n\x1a\n"


def _model(*convs: nn.Conv2d) -> nn.Module:
    return nn.Sequential(*convs)


def _conv(weight: torch.Tensor, groups: int = 1) -> nn.Conv2d:
    c_out, c_in_g, k, _ = weight.shape
    conv = nn.Conv2d(c_in_g * groups, c_out, k, groups=groups, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


# ---------------------------------------------------------------- metrics in closed form


def test_all_zero_layer():
    m = weight_metrics(torch.zeros(8, 4, 3, 3))
    assert m["sparsity"] == 1.0  # t = 1 for an all-zero layer: every filter is below it
    assert m["variance_entropy"] == m["variance_entropy_norm"] == 0.0
    assert m["variance_entropy_clean"] == m["variance_entropy_clean_norm"] == 0.0
    assert m["orthogonality"] == 1.0  # zero channels have cosine 0 with everything
    assert m["norm_l1"] == m["norm_l2"] == 0.0
    assert all(math.isfinite(v) for v in m.values())


def test_pairwise_orthogonal_filters_have_orthogonality_one():
    q, _ = torch.linalg.qr(torch.randn(36, 36, generator=torch.Generator().manual_seed(0)))
    w = q[:, :16].T.reshape(16, 4, 3, 3) * torch.linspace(0.5, 3, 16)[:, None, None, None]  # scale is irrelevant
    assert weight_metrics(w)["orthogonality"] == pytest.approx(1.0, abs=1e-6)
    same = w[:1].repeat(16, 1, 1, 1)  # identical channels: |cos| = 1 for every pair
    assert weight_metrics(same)["orthogonality"] == pytest.approx(0.0, abs=1e-6)


def test_rank_one_layer_has_zero_entropy_and_is_flagged_collapsed():
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(9, generator=g)
    scales = torch.rand(32 * 16, generator=g) + 0.5
    w = (scales[:, None] * basis).reshape(32, 16, 3, 3)
    m = weight_metrics(w)
    assert m["variance_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert m["variance_entropy_norm"] == pytest.approx(0.0, abs=1e-9)
    [row] = layer_metrics(_model(_conv(w)))
    assert row["flags"] == ["collapsed"]


@pytest.mark.parametrize("m", [64, 1024, 16384])
def test_gaussian_filters_reach_the_maximum_entropy(m):
    w = torch.randn(m // 16, 16, 3, 3, generator=torch.Generator().manual_seed(m))
    r = weight_metrics(w)
    assert r["variance_entropy"] <= math.log10(9) + 1e-12  # the uniform spectrum of 9 taps
    assert r["variance_entropy"] > (0.9 if m < 1000 else 0.99) * math.log10(9)  # sampling noise at small m
    assert 0.97 < r["variance_entropy_norm"] < 1.06
    assert r["sparsity"] < 0.01
    assert "near_random" in layer_metrics(_model(_conv(w)))[0]["flags"]


def test_entropy_curve_constants():
    # torchconvquality's fitted curve; its limit L + b is close to log10(9), the largest possible entropy
    assert entropy_curve(1 << 30) == pytest.approx(1.2618047 - 0.31050834, abs=1e-6)
    assert entropy_curve(2) < 0 < entropy_curve(3)


def test_edge_cases_are_finite_and_documented():
    single = weight_metrics(torch.randn(1, 1, 3, 3))  # one filter, one output channel
    assert single["variance_entropy"] == single["variance_entropy_norm"] == 0.0
    assert single["orthogonality"] == 1.0
    two = weight_metrics(torch.randn(2, 1, 3, 3))  # m = 2: h(2) < 0, H = 0, normalised 0
    assert two["variance_entropy_norm"] == pytest.approx(0.0, abs=1e-9)
    # a tap that is zero in every filter: 0 log 0 = 0, and the entropy is that of the other 8 taps
    w = torch.randn(64, 8, 3, 3, generator=torch.Generator().manual_seed(3))
    w[:, :, 1, 1] = 0
    m = weight_metrics(w)
    x = w.reshape(-1, 9)[:, [0, 1, 2, 3, 5, 6, 7, 8]].double()
    s = torch.linalg.svdvals(x - x.mean(0)) ** 2
    p = s / s.sum()
    assert m["variance_entropy"] == pytest.approx(float(-(p * torch.log10(p)).sum()), abs=1e-9)
    assert all(math.isfinite(v) for v in m.values())
    # one non-sparse filter among sparse ones: the clean entropy is 0, not NaN
    w = torch.zeros(4, 4, 3, 3)
    w[0, 0] = torch.randn(3, 3)
    m = weight_metrics(w)
    assert m["sparsity"] == 15 / 16 and m["variance_entropy_clean"] == 0.0


def test_sparsity_threshold_is_strict():
    w = torch.zeros(1, 3, 3, 3)
    w[0, 0, 0, 0] = 1.0
    w[0, 1, 0, 0] = 0.01  # == t: not below it, not sparse
    w[0, 2, 0, 0] = 0.0099  # below t
    m = weight_metrics(w)
    assert m["sparsity"] == pytest.approx(1 / 3)


def test_norms_and_depth():
    w = torch.randn(4, 2, 3, 3)
    m = weight_metrics(w)
    assert m["norm_l1"] == pytest.approx(float(w.abs().sum()), rel=1e-6)
    assert m["norm_l2"] == pytest.approx(float(w.norm()), rel=1e-6)
    model = _model(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 5))
    rows = layer_metrics(model)
    assert [(r["name"], r["conv_index"], r["depth"], r["groups"], r["n"]) for r in rows] == [
        ("0", 0, 0.0, 1, 24), ("2", 2, 2 / 3, 8, 8)]  # 1x1 and 5x5 count for depth, not as layers
    assert [r["name"] for r in layer_metrics(model, kernel=5)] == ["3"]


# ---------------------------------------------------------------- the reference library


def _tcq():
    try:
        import torchconvquality
    except ImportError as exc:  # its 0.3.0 imports distutils, gone from Python >= 3.12 without setuptools
        pytest.skip(f"torchconvquality not importable: {exc}")
    return torchconvquality


def _agree(model: nn.Module, tol: float = 1e-5) -> int:
    ref = _tcq().measure_quality(model)
    ours = {r["name"]: r for r in layer_metrics(model)}
    assert set(ref) == set(ours)
    checked = 0
    for name, values in ref.items():
        for key, value in values.items():
            assert ours[name][key] == pytest.approx(value, abs=tol), (name, key)
            checked += 1
    return checked


def test_agrees_with_torchconvquality_on_grouped_sparse_layers():
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(16, 3, 3, 3, generator=g)
    w2 = torch.randn(16, 1, 3, 3, generator=g)
    w3 = torch.randn(32, 8, 3, 3, generator=g)
    w3[::4, ::2] *= 1e-4  # an eighth of the filters sparse: the clean metrics differ from the others
    model = _model(_conv(w1), _conv(w2, groups=16), _conv(w3, groups=2))
    assert _agree(model) == 3 * 7


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_agrees_with_torchconvquality_on_reference_resnets(name):
    from convforge import create_model
    from convforge.models import load_foreign_weights

    path = WEIGHTS / REFERENCE[name]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    model = load_foreign_weights(create_model(name), path)
    assert _agree(model) == 7 * (len(layer_metrics(model)))


# ---------------------------------------------------------------- distribution shift


def test_shift_identical_sets_is_zero_and_disjoint_sets_large():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(20000, 9, generator=g)
    assert distribution_shift(a, a.clone()) == 0.0
    assert distribution_shift(a, a[torch.randperm(len(a), generator=g)]) == 0.0  # order does not matter
    # b: a's filters normalised away from everything a contains (all positive vs all negative centre taps)
    pos = a.clone()
    pos[:, 4] = pos[:, 4].abs() * 10 + 1
    neg = -pos
    big = distribution_shift(pos, neg)
    assert big > 5.0
    assert distribution_shift(neg, pos) == pytest.approx(big, rel=1e-9)  # symmetric
    same_law = distribution_shift(a[:10000], a[10000:])
    assert 0 < same_law < 0.05
    names, matrix = shift_matrix({"a": a, "pos": pos, "neg": neg})
    assert names == ["a", "pos", "neg"] and matrix[0][0] == 0.0 and matrix[1][2] == pytest.approx(big)


def test_shift_models_and_errors():
    from convforge import create_model

    torch.manual_seed(0)
    r20 = create_model("resnet20")
    assert distribution_shift(r20, r20) == 0.0
    with pytest.raises(ConvforgeError, match="both sets"):
        distribution_shift(torch.zeros(0, 9), torch.randn(5, 9))


# ---------------------------------------------------------------- the filter database


def _small_models():
    torch.manual_seed(0)
    a = _model(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3, groups=4))
    b = _model(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 8, 3))
    return a, b


def test_filterdb_append_read_select_group(tmp_path):
    a, b = _small_models()
    fa, fb = extract_filters(a), extract_filters(b)
    path = tmp_path / "db.h5"
    with FilterDB(path, "a") as db:
        db.append(fa, "a", dataset="cifar10", task="classification")
    with FilterDB(path, "a") as db:  # reopened: appends after the first model
        db.append(fb, "b", dataset="digits")
        with pytest.raises(ConvforgeError, match="already in"):
            db.append(fb, "b")
        with pytest.raises(ConvforgeError, match="--kernel 3"):
            db.append(extract_filters(_model(nn.Conv2d(3, 4, 5)), kernel=5), "c")
    with FilterDB(path) as db:
        assert db.kernel == 3 and db.n_models == 2 and db.n_layers == 5 and len(db) == len(fa) + len(fb)
        assert np.array_equal(db.select(model="a"), fa.filters)
        assert np.array_equal(db.select(dataset="digits"), fb.filters)
        assert np.array_equal(db.select(model="b", layer="2"), fb.of_layer(1))
        layers = db.layers()
        assert list(layers["name"]) == ["0", "1", "2", "0", "2"] and layers["groups"][2] == 4
        assert list(layers["depth"]) == pytest.approx([0, 0.5, 1, 0, 1])
        assert layers["sparsity"][1] == pytest.approx(weight_metrics(a[1].weight)["sparsity"])
        groups = db.groups("depth")
        assert sum(len(v) for v in groups.values()) == len(db)
        assert set(db.groups("dataset")) == {"cifar10", "digits"}
        assert [m["id"] for m in db.models()] == ["a", "b"] and db.models()[0]["task"] == "classification"


def test_filterdb_summary_reads_in_bounded_chunks(tmp_path, monkeypatch):
    import h5py

    a, b = _small_models()
    path = tmp_path / "db.h5"
    with FilterDB(path, "a") as db:
        db.append(extract_filters(a), "a")
        db.append(extract_filters(b), "b")
    with FilterDB(path) as db:
        whole = db.summary(chunk=10 ** 7)
        largest = []
        real = h5py.Dataset.__getitem__

        def spy(self, key):
            out = real(self, key)
            if self.name == "/filters":
                largest.append(out.shape[0])
            return out

        monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
        chunked = db.summary(chunk=100)
    assert max(largest) <= 100 and sum(largest) == whole["n_filters"]
    for key in ("sparse_share", "tap_mean", "tap_std", "pca_explained_variance_ratio", "filters_per_depth_decile"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
    assert whole["filters_per_depth_decile"][0] == 24 + 12 and whole["n_models"] == 2


def test_filterdb_bad_files_and_interrupted_append(tmp_path):
    import h5py

    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(ConvforgeError, match="not a readable HDF5 file"):
        FilterDB(text, "a")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(ConvforgeError, match="not a convforge filter database"):
        FilterDB(other)
    with pytest.raises(ConvforgeError, match="does not exist"):
        FilterDB(tmp_path / "missing.h5")
    a, _ = _small_models()
    path = tmp_path / "db.h5"
    with FilterDB(path, "a") as db:
        db.append(extract_filters(a), "a")
    n = len(extract_filters(a))
    with h5py.File(path, "a") as f:  # rows written, commit never reached
        f["filters"].resize(n + 50, axis=0)
        f["filter_layer"].resize(n + 50, axis=0)
        f["layers"]["name"].resize(9, axis=0)
    with FilterDB(path) as db:
        assert len(db) == n and db.n_layers == 3  # readers trust the committed counts
    with FilterDB(path, "a") as db:
        db.append(extract_filters(a), "a2")
    with h5py.File(path) as f:
        assert f["filters"].shape[0] == 2 * n and f["layers"]["name"].shape[0] == 6


# ---------------------------------------------------------------- health, pictures, command line


def test_filter_health_warns_once_per_new_flag():
    torch.manual_seed(0)
    model = _model(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3))
    first = filter_health(model)
    assert set(first["layers"]) == {"0", "1"} and first["summary"]["filters"] == 48 + 512
    assert any("near-random" in w for w in first["warnings"])  # random init
    assert filter_health(model, previous=first)["warnings"] == []
    with torch.no_grad():
        model[1].weight[:, :, :, :] = 0
        model[1].weight[0, 0] = 1
    later = filter_health(model, previous=first)
    assert later["warnings"] == [f"layer 1: mostly sparse (sparsity {511 / 512:.3f} >= {THRESHOLDS['sparse']})"]
    assert filter_health(nn.Linear(3, 3)) == {"layers": {}, "summary": {}, "thresholds": THRESHOLDS, "warnings": []}


def test_cli_filters_pictures_compare_db_summary(tmp_path, capsys):
    out, db = tmp_path / "out", tmp_path / "f.h5"
    code = main(["filters", "resnet20", "--compare", "resnet32", "--out", str(out), "--db", str(db), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "resnet20:random-init-seed0" and len(result["layers"]) == 19
    assert result["compare"]["names"] == ["resnet20:random-init-seed0", "resnet32:random-init-seed0"]
    assert 0 < result["compare"]["matrix"][0][1] < 0.1  # two random inits: nearly the same distribution
    names = sorted(Path(p).name for p in result["pictures"])
    assert names == ["distribution_shift.png", "eigen_filters.png", "first_layer_rgb.png", "layer_conv1.png",
                     "layer_layer3.2.conv2.png", "metrics_vs_depth.png"]
    assert all(Path(p).read_bytes().startswith(PNG) for p in result["pictures"])
    assert json.loads((out / "metrics.json").read_text())["layers"][0]["name"] == "conv1"
    assert result["db"]["appended"]["n_filters"] == 29744
    assert main(["filters", "--db", str(db), "--summary"]) == 0
    text = capsys.readouterr().out
    assert "29,744 3x3 filters" in text and "resnet20:random-init-seed0" in text
    assert main(["filters", "resnet20", "--no-pictures", "--out", str(out), "--db", str(db)]) == 2
    assert "already in" in capsys.readouterr().err


def test_cli_filters_checkpoint_table_and_errors(tmp_path, capsys, digits_run):
    run_dir = digits_run["run_dir"]
    out = tmp_path / "o"
    assert main(["filters", str(run_dir), "--layer", "stages.0.0.0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert (out / "layer_stages.0.0.0.png").read_bytes().startswith(PNG)
    assert not (out / "first_layer_rgb.png").exists()  # digits are grey: no RGB first layer
    assert "flags: sparse if sparsity >= 0.5" in captured.out and "smallcnn" in captured.out
    for argv, message in [
        (["filters", "resnet2O"], "neither an existing checkpoint"),
        (["filters", "--summary"], "give --db"),
        (["filters", "resnet20", "--weights", str(tmp_path / "nope.th")], "does not exist"),
        (["filters", str(run_dir), "--weights", str(tmp_path / "w.th")], "goes with a model name"),
        (["filters", "resnet20", "--kernel", "0"], "--kernel must be >= 1"),
        (["filters", str(run_dir), "--layer", "stem", "--out", str(out)], "the layers are: stem.0, stages.0.0.0"),
        (["filters", "resnet20", "--model", "resnet32"], "not both"),
        (["filters", "resnet20", "--kernel", "9", "--no-pictures", "--out", str(tmp_path)], "no 2-D convolution"),
        (["filters", "--db", str(tmp_path / "missing.h5"), "--summary"], "does not exist"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.mark.shared
def test_cli_reference_weights_model_option(tmp_path, capsys):
    path = WEIGHTS / REFERENCE["resnet20"]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    assert main(["filters", "--model", "resnet20", "--weights", str(path), "--no-pictures", "--out",
                 str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "resnet20:resnet20-12fca82f"
    assert 0.7 < result["summary"]["variance_entropy_clean_norm"] < 0.95  # trained: below random's ~1.0
