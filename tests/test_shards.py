"""WebDataset shards (wds:DIR): writing them from an image folder, reading them back, order and rank split."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from convforge import TrainConfig, fit
from convforge.cli import main
from convforge.data import load
from convforge.data.shards import ShardLoader, open_shards, write_shards
from convforge.errors import ConfigError, DataError
from convforge.models import create_model
from convforge.train import TrainingInterrupted
from convforge.train.checkpoint import load_checkpoint
from convforge.train.evaluate import evaluate as evaluate_split
from convforge.train.inference import as_loaded, eval_views, evaluate, load_eval_data
from helpers import colour_photos, make_image_folder, read_jsonl

pytest.importorskip("webdataset")

MEAN, STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # normalised values = the uint8 pixels


@pytest.fixture()
def shards(tmp_path):
    written = make_image_folder(tmp_path / "photos", {"train": 4, "val": 2}, size=(10, 12))
    return write_shards(tmp_path / "photos", tmp_path / "shards", shard_size=4), written


def loader(shard_set, **options) -> ShardLoader:
    defaults = dict(split="train", batch_size=2, train=True, image_size=8, store_size=64)
    return ShardLoader(shard_set, mean=MEAN, std=STD, **{**defaults, **options})


def test_shards_read_back_to_the_original_pixels_and_labels(shards):
    shard_set, written = shards
    assert [len(shard_set.splits[s]) for s in ("train", "val")] == [3, 2] and shard_set.count("train") == 12
    assert shard_set.classes == ["cat", "dog", "fish"]
    val = loader(shard_set, split="val", batch_size=4, train=False, image_size=(10, 12), crop_pct=1.0)
    batches = list(val)
    assert [len(y) for _, y in batches] == [4, 2] and len(val) == 2
    got = sorted((int(y), x.round().to(torch.uint8).permute(1, 2, 0).numpy().tobytes())
                 for xs, ys in batches for x, y in zip(xs, ys))
    expected = sorted((label, array.tobytes()) for _, label, array in written["val"])
    assert got == expected


def test_training_batches_depend_on_seed_epoch_and_rank_only(shards):
    shard_set, _ = shards
    first = [(x.clone(), y.clone()) for x, y in loader(shard_set, seed=3)]
    again = [(x.clone(), y.clone()) for x, y in loader(shard_set, seed=3)]
    assert len(first) == 6 and all(x.shape == (2, 3, 8, 8) for x, _ in first)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, again))
    other = loader(shard_set, seed=3)
    other.set_epoch(1)
    assert not all(torch.equal(a, c) for (a, _), (c, _) in zip(first, other))


def test_ranks_read_disjoint_shards_and_make_equally_many_batches(shards):
    shard_set, _ = shards
    ranks = [loader(shard_set, rank=r, world_size=3, shuffle_buffer=3) for r in range(3)]
    mine = [r.rank_shards(epoch=2) for r in ranks]
    assert sorted(p for shards_of_rank in mine for p in shards_of_rank) == sorted(shard_set.splits["train"])
    seen = []
    for r, shards_of_rank in zip(ranks, mine):
        count = sum(n for _, n in shards_of_rank)
        seen += [image.numpy().tobytes() for image, _ in itertools.islice(r.samples(2), count)]
    assert len(seen) == 12 and len(set(seen)) == 12
    assert [len(list(r)) for r in ranks] == [2, 2, 2] == [len(r) for r in ranks]
    with pytest.raises(DataError, match="at least one shard per rank"):
        loader(shard_set, rank=0, world_size=4)


def test_a_bad_tar_member_is_named_or_counted_and_skipped(shards, tmp_path):
    shard_set, _ = shards
    good = tarfile.open(shard_set.splits["val"][0][0])
    with tarfile.open(shard_set.root / "val-000000.tar.new", "w") as tar:
        for member in good.getmembers():
            data = good.extractfile(member).read()
            if member.name == good.getnames()[0]:
                data = data[:20]  # a truncated image
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    good.close()
    (shard_set.root / "val-000000.tar.new").replace(shard_set.splits["val"][0][0])
    val = loader(open_shards(shard_set.root), split="val", batch_size=4, train=False)
    with pytest.raises(DataError, match="val-000000.tar sample '000000000'"):
        list(val)
    skipping = loader(open_shards(shard_set.root), split="val", batch_size=4, train=False, skip_bad_images=True)
    assert sum(len(y) for _, y in skipping) == 5 and skipping.skipped == 1


def test_a_folder_without_shards_or_classes_is_explained(tmp_path):
    with pytest.raises(DataError, match="classes.json"):
        open_shards(tmp_path)
    (tmp_path / "classes.json").write_text('{"classes": ["a"]}')
    with pytest.raises(DataError, match="no shards"):
        open_shards(tmp_path)


# ---------------------------------------------------------------- wds:DIR as training and evaluation data

PHOTO_SIZES = [(24, 40), (40, 24), (32, 32), (30, 44)]


def make_photos(root: Path, per_class: dict[str, int]) -> Path:
    """Three classes told apart by their mean colour, images of varied sizes and aspect ratios."""
    return colour_photos(root, per_class, PHOTO_SIZES, noise=60)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, its shards): 24 train images in 3 shards, 9 val images in 2."""
    root = tmp_path_factory.mktemp("wds")
    photos = make_photos(root / "photos", {"train": 8, "val": 3})
    write_shards(photos, root / "shards", shard_size=8)
    return photos, root / "shards"


def _config(shards: Path, out: Path, **extra) -> TrainConfig:
    values = dict(model="smallcnn", data=f"wds:{shards}", store_size=20, image_size=16, epochs=2, batch_size=8,
                  threads=1, seed=3, model_args={"widths": [8, 16, 32]}, out=str(out))
    return TrainConfig(**{**values, **extra})


def test_load_gives_a_shard_dataset_like_the_image_store(photo_shards):
    photos, shards = photo_shards
    data = load(f"wds:{shards}", image_size=16, store_size=20)
    store = load(f"imagefolder:{photos}", image_size=16, store_size=20)
    assert data.is_shards and not data.is_store and data.classes == store.classes == ["blue", "green", "red"]
    assert (len(data.train), len(data.test), data.val, data.channels) == (24, 9, None, 3)
    assert data.preprocess() == store.preprocess() and data.eval_view == store.eval_view
    assert data.mean == pytest.approx(store.mean, abs=1e-6) and data.std == pytest.approx(store.std, abs=1e-6)
    assert load(f"wds:{shards}", image_size=16, store_size=20).mean == data.mean  # a seeded sample


def test_shard_and_store_evaluation_give_the_same_scores(photo_shards):
    photos, shards = photo_shards
    data = load(f"wds:{shards}", image_size=16, store_size=20, crop_pct=0.8)
    store = load(f"imagefolder:{photos}", image_size=16, store_size=20, crop_pct=0.8)
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=3, in_chans=3, widths=[8, 16, 32])
    got = evaluate_split(model, data.test, store.mean, store.std, view=store.eval_view, batch_size=4, num_classes=3)
    want = evaluate_split(model, store.test, store.mean, store.std, view=store.eval_view, batch_size=4, num_classes=3)
    assert got["images"] == want["images"] == 9 and got["confusion"] == want["confusion"]
    assert got["top1"] == want["top1"] and got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_train_on_shards_and_evaluate_the_checkpoint(tmp_path, photo_shards, capsys):
    photos, shards = photo_shards
    run = tmp_path / "run"
    assert main(["train", "--data", f"wds:{shards}", "--store-size", "20", "--image-size", "16", "--model",
                 "smallcnn", "--model-arg", "widths=[8, 16, 32]", "--epochs", "2",
                 "--batch-size", "8", "--threads", "1", "--seed", "3", "--out", str(run)]) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and np.isfinite(records[-1]["train_loss"])
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["preprocess"]["crop"] == [16, 16] and ckpt.meta["preprocess"]["store_size"] == 20
    assert ckpt.meta["data"] == {"spec": f"wds:{shards}", "train": 24, "test": 9}
    loaded = as_loaded(ckpt)
    own = evaluate(loaded)  # the checkpoint's own data: the shards
    assert own["top1"] == records[-1]["test_top1"] and own["images"] == 9
    assert own["loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-6)
    assert evaluate(loaded, f"imagefolder:{photos}")["top1"] == records[-1]["test_top1"]
    shard_data = load_eval_data(loaded, f"wds:{shards}")
    assert [len(y) for _, y in eval_views(loaded, shard_data, batch_size=4, limit=7)] == [4, 3]
    got, want = ([(int(label), image.numpy().tobytes())
                  for x, y in eval_views(loaded, data) for image, label in zip(x, y)]
                 for data in (shard_data, load_eval_data(loaded, f"imagefolder:{photos}")))
    assert len(got) == 9 and sorted(got) == sorted(want)  # the report's views: the same images, in shard order
    capsys.readouterr()
    assert main(["eval", str(run / "last.safetensors"), "--data", f"wds:{shards}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == records[-1]["test_top1"]
    pytest.importorskip("onnxruntime")
    assert main(["quantize", str(run / "last.safetensors"), "--calib-data", f"wds:{shards}", "--calib-samples", "10",
                 "--out", str(tmp_path / "int8.onnx"), "--json"]) == 0  # calibrated and scored on streamed shards
    report = json.loads(capsys.readouterr().out)
    assert report["calibration_images"] == 10 and report["eval"]["images"] == 9
    assert report["top1_torch"] == records[-1]["test_top1"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, photo_shards) -> Path:
    """An uninterrupted 2-epoch TrivialAugment run on the shards."""
    out = tmp_path_factory.mktemp("reference") / "run"
    fit(_config(photo_shards[1], out, augment="rrc-flip-ta"), quiet=True)
    return out


def _assert_same_run(run: Path, reference: Path) -> None:
    got, want = load_file(str(run / "last.safetensors")), load_file(str(reference / "last.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    keys = ("epoch", "train_loss", "train_top1", "test_top1", "test_loss", "lr")
    assert ([[r[k] for k in keys] for r in read_jsonl(run / "metrics.jsonl")]
            == [[r[k] for k in keys] for r in read_jsonl(reference / "metrics.jsonl")])


def test_resume_after_an_epoch_end_equals_an_uninterrupted_run(tmp_path, photo_shards, reference_run):
    run = tmp_path / "run"

    def stop_after_one(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        fit(_config(photo_shards[1], run, augment="rrc-flip-ta"), on_epoch_end=stop_after_one, quiet=True)
    fit(TrainConfig(resume=str(run)), quiet=True)
    _assert_same_run(run, reference_run)


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, photo_shards, reference_run, monkeypatch):
    real, fired = ShardLoader.iter_from, []

    def iter_from(self, start_batch):  # KeyboardInterrupt instead of batch 1 of epoch 2, once
        batches = real(self, start_batch)
        if not (self.train and self.epoch == 1 and not fired):
            return batches

        def interrupted():
            for index, batch in enumerate(batches, start=start_batch):
                if index == 1:
                    fired.append(index)
                    raise KeyboardInterrupt
                yield batch
        return interrupted()

    monkeypatch.setattr(ShardLoader, "iter_from", iter_from)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        fit(_config(photo_shards[1], run, augment="rrc-flip-ta"), quiet=True)
    assert fired and "interrupted at epoch 2, batch 1" in (run / "train.log").read_text()
    fit(TrainConfig(resume=str(run)), quiet=True)
    _assert_same_run(run, reference_run)


@pytest.mark.parametrize("options", [{}, {"augment": "randaugment", "skip_bad_images": True},
                                     {"augment": "trivialaugment", "shuffle_buffer": 1}])
def test_a_mid_epoch_start_gives_the_rest_of_the_uninterrupted_epoch(shards, options):
    shard_set, _ = shards
    whole = loader(shard_set, seed=5, shuffle_buffer=options.pop("shuffle_buffer", 5), **options)
    whole.set_epoch(1)
    batches = list(whole)
    rest = list(whole.iter_from(4))
    assert len(batches) == 6 and len(rest) == 2
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches[4:], rest))
    assert list(whole.iter_from(6)) == []


def test_shard_augments_are_seeded_and_apply(shards):
    shard_set, _ = shards
    plain = [x for x, _ in loader(shard_set, seed=1)]
    for augment in ("trivialaugment", "randaugment"):
        first = [x for x, _ in loader(shard_set, seed=1, augment=augment)]
        assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in loader(shard_set, seed=1, augment=augment)]))
        assert not all(torch.equal(a, b) for a, b in zip(first, plain))
    center = loader(shard_set, center=True)
    x, _ = next(iter(center))
    assert torch.equal(center.clean_batch(center.last_indices), x)
    with pytest.raises(ConfigError, match="unknown shard augment"):
        loader(shard_set, augment="autoaugment")


def test_other_augments_train_on_shards(tmp_path, photo_shards):
    _, shards = photo_shards
    summary = fit(_config(shards, tmp_path / "run", epochs=1, augment="rrc-flip-ra", randaugment=[1, 5],
                          model="speednet", model_args={}), quiet=True)
    assert np.isfinite(summary["test_top1"])


def test_shard_options_are_checked(tmp_path, photo_shards):
    photos, shards = photo_shards
    with pytest.raises(ConfigError, match="wds:DIR .* needs --store-size"):
        _config(shards, tmp_path / "run", store_size=None).validate()
    with pytest.raises(ConfigError, match="imagefolder:DIR .* or wds:DIR"):
        _config(shards, tmp_path / "run", data="digits").validate()
    with pytest.raises(DataError, match="needs --store-size"):
        load(f"wds:{shards}")
    with pytest.raises(DataError, match="classes.json"):
        load(f"wds:{photos}", store_size=20)
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    for name in ("classes.json", "train-000000.tar"):
        (only_train / name).write_bytes((shards / name).read_bytes())
    with pytest.raises(DataError, match="no val-"):
        load(f"wds:{only_train}", store_size=20)
