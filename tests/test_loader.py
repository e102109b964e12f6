"""Batch loading: crop and flip on whole batches, per-epoch shuffling, sharding across ranks."""

from __future__ import annotations

import pytest
import torch

from convforge.data import BatchLoader, normalize
from convforge.data.dataset import Split
from convforge.data.loader import epoch_permutation, flip_where, random_crop, shard
from convforge.errors import ConfigError
from helpers import assert_ranks_match_single


def _images(n=3, c=2, h=5, w=6):
    return torch.arange(n * c * h * w, dtype=torch.int64).remainder(251).add(1).to(torch.uint8).view(n, c, h, w)


def _id_split(n=23, size=4):
    """Images whose pixels all equal their label, labels 0..n-1, so batches reveal which samples they hold."""
    labels = torch.arange(n)
    images = labels.view(n, 1, 1, 1).expand(n, 1, size, size).to(torch.uint8).contiguous()
    return Split(images, labels)


def test_random_crop_centre_offset_is_identity():
    x = _images()
    for p in (1, 2, 3):
        offsets = torch.full((x.shape[0], 2), p)
        assert torch.equal(random_crop(x, p, offsets), x)


def test_random_crop_zero_offset_shifts_content_down_right():
    x = _images()
    p = 2
    out = random_crop(x, p, torch.zeros(x.shape[0], 2, dtype=torch.long))
    assert out.shape == x.shape
    assert (out[:, :, :p, :] == 0).all() and (out[:, :, :, :p] == 0).all()
    assert torch.equal(out[:, :, p:, p:], x[:, :, :-p, :-p])


def test_random_crop_per_image_offsets():
    x = _images(n=2)
    p = 1
    offsets = torch.tensor([[2, 2], [1, 0]])
    out = random_crop(x, p, offsets)
    # image 0: shifted up-left by one pixel
    assert torch.equal(out[0, :, :-1, :-1], x[0, :, 1:, 1:])
    assert (out[0, :, -1, :] == 0).all() and (out[0, :, :, -1] == 0).all()
    # image 1: rows unchanged, shifted right by one
    assert torch.equal(out[1, :, :, 1:], x[1, :, :, :-1])
    assert (out[1, :, :, 0] == 0).all()


def test_flip_where_flips_only_flagged_images():
    x = _images(n=3)
    out = flip_where(x, torch.tensor([True, False, True]))
    assert torch.equal(out[0], x[0].flip(-1))
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(-1))


def test_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = normalize(x, (0.2,), (0.5,))
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), (torch.tensor([0.0, 0.2, 1.0]) - 0.2) / 0.5, atol=1e-6)


def _labels_per_batch(loader):
    return [y.tolist() for _, y in loader]


def test_shuffle_sees_every_sample_once_per_epoch():
    split = _id_split(23)
    loader = BatchLoader(split, 5, (0.0,), (1.0 / 255,), shuffle=True, seed=3)
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = _labels_per_batch(loader)
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        seen = sorted(sum(batches, []))
        assert seen == list(range(23))
        # the images travel with their labels
        for x, y in loader:
            assert torch.allclose(x[:, 0, 0, 0], y.float())


def test_shuffle_order_depends_only_on_seed_and_epoch():
    split = _id_split(40)
    a = BatchLoader(split, 8, (0.0,), (1.0,), shuffle=True, seed=1)
    b = BatchLoader(split, 8, (0.0,), (1.0,), shuffle=True, seed=1)
    torch.manual_seed(123)  # global RNG state must not matter
    a.set_epoch(2)
    torch.manual_seed(456)
    b.set_epoch(2)
    order_a = sum(_labels_per_batch(a), [])
    assert order_a == sum(_labels_per_batch(b), [])
    b.set_epoch(3)
    assert order_a != sum(_labels_per_batch(b), [])
    c = BatchLoader(split, 8, (0.0,), (1.0,), shuffle=True, seed=2)
    c.set_epoch(2)
    assert order_a != sum(_labels_per_batch(c), [])
    assert order_a != list(range(40))
    assert epoch_permutation(40, 1, 2).tolist() == order_a


def test_no_shuffle_is_in_order_and_keeps_last_partial_batch():
    split = _id_split(10)
    loader = BatchLoader(split, 4, (0.0,), (1.0,), shuffle=False, drop_last=True)
    assert _labels_per_batch(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(loader) == 3


def test_drop_last_when_shuffling():
    loader = BatchLoader(_id_split(10), 4, (0.0,), (1.0,), shuffle=True, drop_last=True)
    assert [len(b) for b in _labels_per_batch(loader)] == [4, 4]
    assert len(loader) == 2


def test_iter_from_skips_leading_batches():
    loader = BatchLoader(_id_split(20), 6, (0.0,), (1.0,), shuffle=True, seed=4, augment="crop-flip", crop_padding=1)
    loader.set_epoch(1)
    full = list(loader)
    tail = list(loader.iter_from(2))
    assert len(tail) == len(full) - 2
    for (x1, y1), (x2, y2) in zip(full[2:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_shard_union_equals_global_batch():
    indices = epoch_permutation(37, 0, 5)
    b = 4
    global_batches = shard(indices, 2 * b, 0, 1, drop_last=False)
    rank0 = shard(indices, b, 0, 2, drop_last=False)
    rank1 = shard(indices, b, 1, 2, drop_last=False)
    assert len(rank0) == len(global_batches)
    for k, glob in enumerate(global_batches):
        union = rank0[k].tolist() + (rank1[k].tolist() if k < len(rank1) else [])
        assert sorted(union) == sorted(glob.tolist())
        assert not set(rank0[k].tolist()) & set(rank1[k].tolist() if k < len(rank1) else [])
    dropped = shard(indices, b, 1, 2, drop_last=True)
    assert len(dropped) == 37 // 8 and all(len(x) == b for x in dropped)


def test_sharded_loaders_see_same_samples_and_augmentations():
    split = _id_split(32, size=6)
    split = Split(split.images * 0 + torch.arange(36, dtype=torch.uint8).view(1, 1, 6, 6), split.labels)
    kwargs = dict(shuffle=True, seed=7, augment="crop-flip", crop_padding=2, drop_last=True)
    single = BatchLoader(split, 8, (0.0,), (1.0,), **kwargs)
    ranks = [BatchLoader(split, 4, (0.0,), (1.0,), rank=r, world_size=2, **kwargs) for r in range(2)]
    for loader in (single, *ranks):
        loader.set_epoch(1)
    per_rank = [list(r) for r in ranks]
    assert_ranks_match_single(single, per_rank)  # each sample viewed identically whichever rank loads it


def test_augment_crop_flip_changes_images_but_keeps_values():
    split = Split(_images(n=16, c=1, h=8, w=8), torch.arange(16))
    plain = BatchLoader(split, 16, (0.0,), (1.0 / 255,), shuffle=False)
    aug = BatchLoader(split, 16, (0.0,), (1.0 / 255,), shuffle=False, augment="crop-flip", crop_padding=2)
    (x0, _), = list(plain)
    (x1, _), = list(aug)
    assert x1.shape == x0.shape
    assert not torch.equal(x0, x1)
    # with mean 0 and std 1/255 normalisation is the identity on pixel values
    assert torch.equal(x0, split.images.float())
    flip_only = BatchLoader(split, 16, (0.0,), (1.0 / 255,), augment="flip")
    (x2, _), = list(flip_only)
    for i in range(16):
        assert torch.equal(x2[i], x0[i]) or torch.equal(x2[i], x0[i].flip(-1))


def test_channels_last_batches():
    loader = BatchLoader(_id_split(4), 4, (0.0,), (1.0,), channels_last=True)
    (x, _), = list(loader)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_loader_rejects_bad_options():
    with pytest.raises(ConfigError, match="unknown augment 'rotate'"):
        BatchLoader(_id_split(4), 2, (0.0,), (1.0,), augment="rotate")
    with pytest.raises(ConfigError, match="batch size"):
        BatchLoader(_id_split(4), 0, (0.0,), (1.0,))
