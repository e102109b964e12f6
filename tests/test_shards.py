"""WebDataset shards (wds:DIR): writing them from an image folder, reading them back, order and rank split."""

from __future__ import annotations

import io
import itertools
import tarfile

import pytest
import torch

from convforge.data.shards import ShardLoader, open_shards, write_shards
from convforge.errors import DataError
from helpers import make_image_folder

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
