"""Batch views of variable-size images (data/views.py) and the prefetching StoreLoader (data/store_loader.py)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from convforge.data.loader import normalize, shard
from convforge.data.store import build_store
from convforge.data.store_loader import StoreLoader
from convforge.data.views import (
    TRIVIAL_AUGMENT_OPS,
    apply_op,
    apply_trivial_augment,
    crop_resize,
    eval_resize_size,
    flip,
    flip_params,
    random_resized_crop_params,
    resize_center_crop,
    resize_center_crop_batch,
    resize_uint8,
    trivial_augment,
    trivial_augment_magnitudes,
    trivial_augment_params,
)
from convforge.errors import ConfigError
from helpers import assert_ranks_match_single, save_image


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_sizes(n: int, low: int, high: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(low, high, (n, 2), generator=_gen(seed))


# ---- RandomResizedCrop --------------------------------------------------------------------------------

def test_crop_boxes_lie_inside_and_follow_scale_and_ratio():
    sizes = _random_sizes(400, 300, 900)
    boxes = random_resized_crop_params(sizes, (0.08, 1.0), (3 / 4, 4 / 3), _gen(1))
    top, left, h, w = boxes.unbind(1)
    height, width = sizes.unbind(1)
    assert boxes.dtype == torch.int64 and boxes.shape == (400, 4)
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    share = (h * w).double() / (height * width).double()
    # rounding h and w to integers moves the share by at most about 1 / min side
    assert share.min() >= 0.08 - 0.01 and share.max() <= 1.0 + 1e-9
    aspect = w.double() / h.double()
    assert aspect.min() >= 3 / 4 - 0.01 and aspect.max() <= 4 / 3 + 0.01
    assert share.std() > 0.15  # spread over the range, not stuck at one value


def test_crop_boxes_fall_back_to_the_central_crop_clamped_to_the_ratio():
    sizes = torch.tensor([[5, 500], [500, 5], [40, 40]])
    # full area on images far outside the ratio range (or with scale=1, ratio 2..3 on a square): no try fits
    boxes = random_resized_crop_params(sizes, (1.0, 1.0), (2.0, 3.0), _gen(0))
    assert boxes.tolist() == [
        [0, (500 - 15) // 2, 5, 15],          # too wide: full height, width = round(5 * 3)
        [(500 - 2) // 2, 0, 2, 5],            # too tall: full width, height = round(5 / 2) (banker's: 2)
        [(40 - 20) // 2, 0, 20, 40],          # square below the range: full width, height round(40 / 2)
    ]
    inside = random_resized_crop_params(torch.tensor([[30, 36]]), (1.0, 1.0), (0.5, 2.0), _gen(0))
    assert inside.tolist() == [[0, 0, 30, 36]]  # within the ratio range: the whole image, found or fallen back to


def test_crop_boxes_are_deterministic_per_generator_seed():
    sizes = _random_sizes(64, 20, 200)
    a = random_resized_crop_params(sizes, generator=_gen(5))
    b = random_resized_crop_params(sizes, generator=_gen(5))
    c = random_resized_crop_params(sizes, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_params_reject_bad_ranges():
    with pytest.raises(ConfigError, match="scale"):
        random_resized_crop_params(torch.tensor([[10, 10]]), (0.5, 0.2))
    with pytest.raises(ConfigError, match="ratio"):
        random_resized_crop_params(torch.tensor([[10, 10]]), (0.1, 1.0), (0.0, 1.0))


# ---- crop_resize / resize_center_crop -----------------------------------------------------------------

def test_crop_resize_cuts_the_box_and_averages_a_gradient():
    ramp = (torch.arange(16) * 10).to(torch.uint8).view(1, 1, 16).expand(3, 12, 16).contiguous()
    quadrants = torch.arange(4, dtype=torch.uint8).view(1, 2, 1, 2, 1).expand(1, 2, 5, 2, 5).reshape(1, 10, 10)
    boxes = torch.tensor([[2, 0, 8, 16], [5, 5, 5, 5]])
    out = crop_resize([ramp, quadrants.expand(3, 10, 10)], boxes, (4, 8))
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4, 8)
    # halving a linear ramp with an antialiased (triangle) filter: interior samples are the ramp at 2i + 0.5
    assert out[0, :, :, 1:7].eq(torch.tensor([25, 45, 65, 85, 105, 125], dtype=torch.uint8)).all()
    assert out[1].eq(3).all()  # bottom-right quadrant only
    same = crop_resize([ramp], torch.tensor([[1, 3, 4, 5]]), (4, 5))
    assert torch.equal(same[0], ramp[:, 1:5, 3:8])


def test_eval_resize_size_follows_timm_floor():
    assert eval_resize_size((224, 224), 0.875) == (256, 256)
    assert eval_resize_size((224, 224), 224 / 232) == (232, 232)
    assert eval_resize_size((160, 128), 1.0) == (160, 128)
    with pytest.raises(ConfigError, match="crop_pct"):
        eval_resize_size((224, 224), 1.5)


@pytest.mark.parametrize("shape", [(3, 60, 40), (3, 40, 60), (1, 33, 33)])
def test_resize_center_crop_resizes_the_shorter_side_then_crops_the_centre(shape):
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=_gen(2))
    out = resize_center_crop(image, (14, 14), crop_pct=0.875)  # cover 16 x 16
    assert out.shape == (shape[0], 14, 14) and out.dtype == torch.uint8
    c, h, w = shape
    short = min(h, w)
    resized_shape = (16, int(w * 16 / short)) if h <= w else (int(h * 16 / short), 16)
    resized = resize_uint8(image, resized_shape)
    top, left = round((resized_shape[0] - 14) / 2), round((resized_shape[1] - 14) / 2)
    assert torch.equal(out, resized[:, top:top + 14, left:left + 14])


def test_resize_center_crop_non_square_size_and_crop_pct_one():
    image = torch.zeros(3, 50, 100, dtype=torch.uint8)
    image[:, :, 40:60] = 200  # a vertical bar in the middle
    out = resize_center_crop(image, (20, 30), crop_pct=1.0)  # covers 20 x 30: resized to 20 x 40
    assert out.shape == (3, 20, 30)
    assert out[:, :, 15].eq(200).all() and out[:, :, 0].eq(0).all()
    exact = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=_gen(0))
    assert torch.equal(resize_center_crop(exact, (8, 8), crop_pct=1.0), exact)
    batch = resize_center_crop_batch([exact, image], (8, 8))
    assert batch.shape == (2, 3, 8, 8)


# ---- flip ---------------------------------------------------------------------------------------------

def test_crop_resize_writes_channels_last_views_and_mirrors_where_asked():
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=_gen(h)) for h, w in ((9, 13), (12, 7))]
    hwc_image = images[0].permute(1, 2, 0).contiguous().permute(2, 0, 1)  # an image store's interleaved layout
    boxes = torch.tensor([[1, 2, 6, 9], [0, 1, 12, 5]])
    plain = crop_resize(images, boxes, (5, 4))
    assert plain.is_contiguous(memory_format=torch.channels_last)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        assert torch.equal(plain[i], resize_uint8(images[i][:, top:top + h, left:left + w], (5, 4)))
    mirrored = crop_resize([hwc_image, images[1]], boxes, (5, 4), flips=torch.tensor([True, False]))
    assert torch.equal(mirrored[0], plain[0].flip(-1)) and torch.equal(mirrored[1], plain[1])


def test_bicubic_views_are_pytorchs_antialiased_uint8_bicubic():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=_gen(4))
    expected = torch.nn.functional.interpolate(image[None], size=(10, 14), mode="bicubic", antialias=True)[0]
    assert torch.equal(resize_uint8(image, (10, 14), "bicubic"), expected)
    assert not torch.equal(resize_uint8(image, (10, 14), "bicubic"), resize_uint8(image, (10, 14)))
    view = resize_center_crop_batch([image], (8, 8), 0.8, "bicubic")[0]
    assert torch.equal(view, resize_center_crop(image, (8, 8), 0.8, "bicubic"))
    with pytest.raises(ConfigError, match="interpolation must be one of bilinear, bicubic"):
        resize_uint8(image, (10, 14), "nearest")


def test_resize_uint8_of_the_same_size_is_a_copy():
    image = torch.zeros(3, 4, 5, dtype=torch.uint8)
    same = resize_uint8(image, (4, 5))
    same[0, 0, 0] = 7
    assert image[0, 0, 0] == 0 and same[None].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_normalize_gives_the_asked_layout_and_the_same_values_from_uint8_and_float(memory_format):
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=_gen(1))
    expected = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    for source in (x, x.contiguous(memory_format=torch.channels_last), x.float()):
        out = normalize(source, MEAN, STD, memory_format)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=memory_format)
        assert torch.allclose(out.double(), expected, atol=1e-5)
    assert normalize(x[0], MEAN, STD).shape == (1, 3, 4, 5)


def test_flip_mirrors_exactly_the_images_whose_coin_says_so():
    batch = torch.randint(0, 256, (32, 3, 4, 6), dtype=torch.uint8, generator=_gen(3))
    out = flip(batch, _gen(9))
    coins = flip_params(32, _gen(9))
    assert 0 < coins.sum() < 32
    assert torch.equal(out[coins], batch[coins].flip(3))
    assert torch.equal(out[~coins], batch[~coins])
    assert torch.equal(flip(batch, _gen(9)), out)


# ---- TrivialAugmentWide -------------------------------------------------------------------------------

def _one(op: str, x: torch.Tensor, mag: float) -> torch.Tensor:
    return apply_op(x[None], op, mag)[0]


def test_magnitude_table_matches_trivial_augment_wide():
    assert len(TRIVIAL_AUGMENT_OPS) == 14
    assert trivial_augment_magnitudes("rotate")[-1] == 135.0
    assert trivial_augment_magnitudes("translate_x")[-1] == 32.0
    assert math.isclose(trivial_augment_magnitudes("shear_y")[-1].item(), 0.99, rel_tol=1e-6)
    assert trivial_augment_magnitudes("posterize")[[0, 5, 15, 30]].tolist() == [8, 7, 5, 2]
    assert trivial_augment_magnitudes("solarize")[[0, 30]].tolist() == [255.0, 0.0]
    assert len(trivial_augment_magnitudes("brightness")) == 31
    with pytest.raises(ConfigError, match="unknown TrivialAugment op"):
        trivial_augment_magnitudes("invert")


def test_identity_solarize_posterize_exact_values():
    x = torch.tensor([0, 63, 100, 127, 128, 200, 255], dtype=torch.uint8).view(1, 1, 7)
    assert torch.equal(_one("identity", x, 0.0), x)
    assert _one("solarize", x, 128.0).flatten().tolist() == [0, 63, 100, 127, 127, 55, 0]
    assert _one("solarize", x, 255.0).flatten().tolist() == [0, 63, 100, 127, 128, 200, 0]
    assert _one("posterize", x, 2.0).flatten().tolist() == [0, 0, 64, 64, 128, 192, 192]
    assert torch.equal(_one("posterize", x, 8.0), x)


def test_equalize_exact_values_and_agrees_with_pil():
    two = torch.cat([torch.full((1, 8, 32), 10), torch.full((1, 8, 32), 20)], dim=1).to(torch.uint8)
    out = _one("equalize", two, 0.0)
    assert out[:, :8].eq(0).all() and out[:, 8:].eq(255).all()
    rng = np.random.default_rng(0)
    for array in (rng.integers(40, 120, size=(24, 30, 3), dtype=np.uint8),
                  rng.integers(0, 256, size=(17, 20), dtype=np.uint8)):
        expected = np.asarray(ImageOps.equalize(Image.fromarray(array)))
        tensor = torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)[None]
        got = _one("equalize", tensor, 0.0)
        got = got.permute(1, 2, 0).numpy() if array.ndim == 3 else got[0].numpy()
        assert np.array_equal(got, expected)


def test_colour_ops_exact_values():
    x = torch.tensor([0, 100, 101, 200], dtype=torch.uint8).view(1, 1, 4)
    assert _one("brightness", x, 0.5).flatten().tolist() == [0, 150, 151, 255]
    assert _one("brightness", x, -0.5).flatten().tolist() == [0, 50, 50, 100]
    two = torch.tensor([0, 100], dtype=torch.uint8).view(1, 1, 2)  # mean 50
    assert _one("contrast", two, -0.5).flatten().tolist() == [25, 75]
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    assert _one("color", red, -1.0).flatten().tolist() == [76, 76, 76]  # int(0.2989 * 255) grey
    grey = torch.full((3, 2, 2), 90, dtype=torch.uint8)
    assert torch.equal(_one("color", grey, 0.9), grey)
    stretch = torch.tensor([[50, 100, 150], [7, 7, 7]], dtype=torch.uint8).view(2, 1, 3)
    assert _one("autocontrast", stretch, 0.0).tolist() == [[[0, 127, 255]], [[7, 7, 7]]]


def test_sharpness_blends_with_the_smoothed_interior():
    dot = torch.zeros(1, 5, 5, dtype=torch.uint8)
    dot[0, 2, 2] = 255
    smooth = _one("sharpness", dot, -1.0)  # factor 0: the smoothed image itself
    assert smooth[0, 2, 2] == round(255 * 5 / 13)
    assert smooth[0, 1:4, 1:4].sum() == round(255 * 5 / 13) + 8 * round(255 / 13)
    assert smooth[0, 0].eq(0).all() and smooth[0, :, 0].eq(0).all()  # borders are never smoothed
    flat = torch.full((3, 6, 6), 77, dtype=torch.uint8)
    assert torch.equal(_one("sharpness", flat, 0.9), flat)


def test_geometric_ops_exact_pixels():
    x = (torch.arange(16, dtype=torch.uint8) + 1).view(1, 4, 4)
    right = _one("translate_x", x, 1.9)  # int(1.9) = 1 pixel to the right
    assert right[0, :, 0].eq(0).all() and torch.equal(right[0, :, 1:], x[0, :, :3])
    up = _one("translate_y", x, -2.0)
    assert torch.equal(up[0, :2], x[0, 2:]) and up[0, 2:].eq(0).all()
    assert torch.equal(_one("rotate", x, 90.0), torch.rot90(x, 1, dims=(1, 2)))  # counter-clockwise
    assert torch.equal(_one("rotate", x, 180.0), x.flip(1).flip(2))
    sheared = _one("shear_x", x, 0.5)  # x_in = x_out + 0.5 * y_out about the top-left corner
    for row, shift in enumerate([0, 1, 1, 2]):
        assert torch.equal(sheared[0, row, :4 - shift], x[0, row, shift:])
        assert sheared[0, row, 4 - shift:].eq(0).all()
    sheared_y = _one("shear_y", x, 0.5)
    assert torch.equal(sheared_y, _one("shear_x", x.transpose(1, 2), 0.5).transpose(1, 2))


def test_trivial_augment_is_one_op_per_image_and_deterministic():
    batch = torch.randint(0, 256, (40, 3, 10, 12), dtype=torch.uint8, generator=_gen(4))
    out = trivial_augment(batch, _gen(11))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out, trivial_augment(batch, _gen(11)))
    ops, mags = trivial_augment_params(40, _gen(11))
    assert len(set(ops.tolist())) > 5
    for i in range(40):
        name = TRIVIAL_AUGMENT_OPS[int(ops[i])]
        assert torch.equal(out[i], apply_op(batch[i:i + 1], name, mags[i])[0])
    assert torch.equal(apply_trivial_augment(batch, torch.zeros(40, dtype=torch.long), mags), batch)


# ---- StoreLoader --------------------------------------------------------------------------------------

class FakeStore:
    """The ImageStore interface over in-memory images of varying sizes; label i = i so samples are traceable."""

    def __init__(self, n: int = 23, channels: int = 3, fail_at: int | None = None, seed: int = 0) -> None:
        gen = _gen(seed)
        sizes = torch.randint(6, 20, (n, 2), generator=gen)
        self._images = [torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=gen)
                        for h, w in sizes.tolist()]
        self.classes = [f"c{i}" for i in range(n)]
        self.labels, self.sizes, self.channels = torch.arange(n), sizes, channels
        self.fail_at, self.reads = fail_at, 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._images)

    def image(self, i: int) -> torch.Tensor:
        with self._lock:
            self.reads += 1
        if i == self.fail_at:
            raise OSError(f"cannot read image {i}")
        return self._images[i]


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _train_loader(store, batch_size=4, **kwargs) -> StoreLoader:
    options = dict(train=True, image_size=(8, 10), augment="trivialaugment", seed=3, prefetch=2)
    options.update(kwargs)
    return StoreLoader(store, batch_size, MEAN, STD, **options)


def test_prefetching_does_not_change_the_batches():
    store = FakeStore()
    for epoch in (0, 1):
        runs = []
        for prefetch in (0, 2, 3):
            loader = _train_loader(store, prefetch=prefetch)
            loader.set_epoch(epoch)
            runs.append(list(loader))
        assert len(runs[0]) == len(loader) == 23 // 4  # drop_last by default when training
        for other in runs[1:]:
            for (xa, ya), (xb, yb) in zip(runs[0], other):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first, second = (list(_train_loader(store, seed=s)) for s in (3, 4))
    assert not torch.equal(first[0][0], second[0][0])


def test_iter_from_equals_the_tail_of_a_full_pass():
    loader = _train_loader(FakeStore())
    loader.set_epoch(2)
    full = list(loader)
    tail = list(loader.iter_from(3))
    assert len(tail) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(loader.last_indices, tail[-1][1])
    running = loader.iter_from(0)
    first = next(running)
    loader.set_epoch(3)  # too late for the pass under way: its batches were drawn for epoch 2
    for (xa, ya), (xb, yb) in zip(full, [first, *running]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_ranks_partition_each_global_batch_with_identical_views():
    store = FakeStore(n=26)
    single = _train_loader(store, batch_size=6, drop_last=False)
    ranks = [_train_loader(store, batch_size=3, rank=r, world_size=2, drop_last=False) for r in range(2)]
    for loader in (single, *ranks):
        loader.set_epoch(1)
    per_rank = [list(r) for r in ranks]
    expected = [shard(torch.randperm(26, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1)), 3, r, 2,
                      False) for r in range(2)]
    for r in range(2):
        assert [y.tolist() for _, y in per_rank[r]] == [b.tolist() for b in expected[r]]
    assert_ranks_match_single(single, per_rank)  # each sample viewed identically whichever rank loads it


def test_evaluation_batches_shapes_order_and_normalisation():
    store = FakeStore(n=10)
    loader = StoreLoader(store, 4, MEAN, STD, train=False, image_size=(8, 6), crop_pct=0.75, prefetch=1,
                         channels_last=True)
    batches = list(loader)
    assert [y.tolist() for _, y in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 8, 6)
        assert x.is_contiguous(memory_format=torch.channels_last)
        views = resize_center_crop_batch([store.image(int(i)) for i in y], (8, 6), 0.75)
        assert torch.allclose(x, normalize(views, MEAN, STD))
    assert torch.allclose(loader.clean_batch(torch.tensor([8, 9])), batches[-1][0])
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_training_views_are_crops_of_the_right_size():
    store = FakeStore(n=8, channels=1)
    loader = StoreLoader(store, 8, (0.0,), (1 / 255,), train=True, image_size=5, flip=False, seed=1)
    (x, y), = list(loader)
    assert x.shape == (8, 1, 5, 5) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 255 and torch.equal(x, x.round())


def test_a_worker_error_surfaces_in_the_consumer():
    loader = _train_loader(FakeStore(fail_at=7), drop_last=False, shuffle=False)
    outcome: dict[str, BaseException | int] = {}

    def consume() -> None:
        try:
            outcome["batches"] = len(list(loader))
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever arrives
            outcome["error"] = exc

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the loader hung on a worker error"
    assert isinstance(outcome.get("error"), OSError) and "image 7" in str(outcome["error"])


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("convforge-store-loader")]


def test_breaking_out_early_stops_the_threads_and_bounds_the_work():
    store = FakeStore(n=40)
    loader = _train_loader(store, batch_size=2, prefetch=2, shuffle=False)
    for x, _ in loader:
        assert _loader_threads()
        break
    assert not _loader_threads()
    assert store.reads <= (2 + 1) * 2  # the batch taken plus at most ``prefetch`` prepared ahead


def test_store_loader_rejects_bad_options():
    store = FakeStore(n=4)
    with pytest.raises(ConfigError, match="augment"):
        StoreLoader(store, 2, MEAN, STD, train=True, image_size=8, augment="autoaugment")
    with pytest.raises(ConfigError, match="evaluation"):
        StoreLoader(store, 2, MEAN, STD, train=False, image_size=8, shuffle=True)
    with pytest.raises(ConfigError, match="one per channel"):
        StoreLoader(store, 2, (0.5,), (0.2,), train=True, image_size=8)
    with pytest.raises(ConfigError, match="image_size"):
        StoreLoader(store, 2, MEAN, STD, train=True, image_size=(8, 0))
    with pytest.raises(ConfigError, match="scale"):
        StoreLoader(store, 2, MEAN, STD, train=True, image_size=8, scale=(1.0, 0.5))
    with pytest.raises(ConfigError, match="prefetch"):
        StoreLoader(store, 2, MEAN, STD, train=True, image_size=8, prefetch=-1)


def test_store_loader_on_a_built_image_store(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(12, 20), (20, 12), (16, 16), (9, 30), (25, 14), (14, 14), (18, 10)]):
        path = save_image(tmp_path / "photos" / f"img{i}.png", rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        files.append((str(path), i % 2))
    store = build_store(files, ["a", "b"], tmp_path / "store", store_size=16, workers=1, log=lambda _: None)
    assert len(store) == 7 and store.sizes.min() >= 9
    runs = [list(StoreLoader(store, 3, MEAN, STD, train=True, image_size=(8, 8), augment="trivialaugment",
                             drop_last=False, seed=5, prefetch=p)) for p in (0, 2)]
    for (xa, ya), (xb, yb) in zip(*runs):
        assert xa.shape[1:] == (3, 8, 8) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(torch.cat([y for _, y in runs[0]]).tolist()) == sorted(store.labels.tolist())
    evaluation = StoreLoader(store, 4, MEAN, STD, train=False, image_size=(8, 8))
    (x, y), _ = list(evaluation)
    views = resize_center_crop_batch([store.image(i) for i in range(4)], (8, 8))
    assert torch.allclose(x, normalize(views, MEAN, STD)) and torch.equal(y, store.labels[:4])
