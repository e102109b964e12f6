"""The 15 common corruptions (convforge.data.corruptions): shapes, seeding, chunking, severity order, the formulas."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import convforge.data.corruptions as corruptions
from convforge.data.corruptions import CORRUPTION_GROUPS, CORRUPTIONS, DEVIATIONS, corrupt
from convforge.data.corruptions.params import CIFAR, IMAGENET, TABLES
from convforge.errors import ConfigError, DataError

REFERENCE_ORDER = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
RANDOM = [name for name in CORRUPTIONS if name not in DETERMINISTIC]
# Where the reference's own tables make the damage grow with severity. Not glass_blur (CIFAR sigma 0.4 at 3, 0.25
# at 4), elastic_transform (CIFAR severity 1 is the largest affine jitter), frost (the image weight falls while the
# frost weight barely rises) or snow (flake settings change non-monotonically); and not ImageNet fog, whose
# strength stays 2.5 from severity 3 to 4 while only the fractal's roughness changes.
MONOTONE = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur", "fog",
            "brightness", "contrast", "pixelate", "jpeg_compression"]


def scenes(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth synthetic photos: colour gradients, a disc, a bar and a patch of smoothed noise, varied per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        a, b, cx, cy = rng.uniform(0.2, 0.8, size=4)
        img = np.stack([xx * a, yy * b, 1 - xx * yy], axis=-1) * 200 + 20
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < 0.05] = rng.uniform(0, 255, size=3)
        img[(yy > 0.75) & (xx > a / 2) & (xx < a / 2 + 0.4)] = rng.uniform(0, 255, size=3)
        patch = ndimage.gaussian_filter(rng.uniform(0, 255, size=(size // 3, size // 3, 3)), (1, 1, 0))
        img[:size // 3, -(size // 3):] = (patch - patch.mean()) * 3 + 128
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def grey(value: int, n: int = 4, size: int = 32) -> np.ndarray:
    return np.full((n, size, size, 3), value, dtype=np.uint8)


def test_names_groups_tables_and_deviations() -> None:
    assert CORRUPTIONS == REFERENCE_ORDER
    assert sorted(n for g in CORRUPTION_GROUPS.values() for n in g) == sorted(CORRUPTIONS)
    assert set(CORRUPTION_GROUPS) == {"noise", "blur", "weather", "digital"}
    for table in (CIFAR, IMAGENET):
        assert set(table) == set(CORRUPTIONS) and all(len(row) == 5 for row in table.values())
    assert CIFAR["gaussian_noise"][0] == 0.04 and IMAGENET["jpeg_compression"] == (25, 18, 15, 10, 7)
    assert {"motion_blur", "frost"} <= set(DEVIATIONS) <= set(CORRUPTIONS)
    assert all(isinstance(v, str) and len(v) > 40 for v in DEVIATIONS.values())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_shape_dtype_change_and_seed(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    clean = scenes(3, 32)
    for severity in range(1, 6):
        out = corrupt(clean, name, severity, seed=1)
        assert out.dtype == np.uint8 and out.shape == clean.shape
        assert not np.array_equal(out, clean), (name, severity)
        assert np.array_equal(out, corrupt(clean, name, severity, seed=1))
        if name in RANDOM:
            assert not np.array_equal(out, corrupt(clean, name, severity, seed=2)), (name, severity)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_imagenet_table_on_96px(name: str) -> None:
    clean = scenes(1, 96, seed=3)
    for severity in (1, 3, 5):
        out = corrupt(clean, name, severity, seed=4)
        assert out.dtype == np.uint8 and out.shape == clean.shape and not np.array_equal(out, clean)
        assert np.array_equal(out, corrupt(clean, name, severity, seed=4, params="imagenet"))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_chunks_give_the_whole_batch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = scenes(7, 32, seed=5)
    whole = corrupt(clean, name, 3, seed=9)
    parts = [corrupt(clean[a:b], name, 3, seed=9, first_index=a) for a, b in ((0, 3), (3, 4), (4, 7))]
    assert np.array_equal(np.concatenate(parts), whole)
    monkeypatch.setattr(corruptions, "_CHUNK_PIXELS", 32 * 32)  # internal chunks of one image (glass_blur: four)
    assert np.array_equal(corrupt(clean, name, 3, seed=9), whole)
    if name in RANDOM:  # image i's draws depend on its index in the split, not on its place in the batch
        assert not np.array_equal(corrupt(clean[3:4], name, 3, seed=9), whole[3:4])


@pytest.mark.parametrize("name", MONOTONE)
def test_damage_grows_with_severity(name: str) -> None:
    for clean, params in ((scenes(6, 32, seed=6), "cifar"), (scenes(2, 96, seed=6), "imagenet")):
        if name == "fog" and params == "imagenet":
            continue
        diffs = [mad(corrupt(clean, name, s, seed=0, params=params), clean) for s in range(1, 6)]
        assert all(b >= a for a, b in zip(diffs, diffs[1:])), (params, np.round(diffs, 2))
        assert diffs[-1] > diffs[0] * 1.3, (params, np.round(diffs, 2))


@pytest.mark.parametrize(("params", "severities"), [("cifar", range(1, 6)), ("imagenet", (1, 2))])
def test_gaussian_noise_std_is_the_table_value(params: str, severities: range) -> None:
    clean = grey(128, n=8)
    for s in severities:
        out = corrupt(clean, "gaussian_noise", s, seed=s, params=params).astype(np.float64) / 255
        assert out.std() == pytest.approx(TABLES[params]["gaussian_noise"][s - 1], rel=0.03)
        assert out.mean() == pytest.approx(128 / 255, abs=0.005)


def test_shot_noise_is_poisson_with_the_table_rate() -> None:
    for s, rate in enumerate(CIFAR["shot_noise"], start=1):
        out = corrupt(grey(128, n=8), "shot_noise", s, seed=s).astype(np.float64) / 255
        assert out.var() == pytest.approx(128 / 255 / rate, rel=0.08)


@pytest.mark.parametrize("params", ["cifar", "imagenet"])
def test_impulse_noise_hits_the_table_fraction(params: str) -> None:
    clean = grey(128, n=8)
    for s, amount in enumerate(TABLES[params]["impulse_noise"], start=1):
        out = corrupt(clean, "impulse_noise", s, seed=s, params=params)
        salt, pepper = (out == 255).mean(), (out == 0).mean()
        hit = salt + pepper
        assert np.isin(out, [0, 128, 255]).all()
        assert abs(hit - amount) < 4 * np.sqrt(amount * (1 - amount) / out.size)
        assert salt == pytest.approx(pepper, abs=4 * np.sqrt(amount / out.size))


@pytest.mark.parametrize("params", ["cifar", "imagenet"])
def test_brightness_adds_c_to_the_hsv_value(params: str) -> None:
    for s, c in enumerate(TABLES[params]["brightness"], start=1):
        out = corrupt(grey(90, n=1), "brightness", s, params=params)
        assert np.abs(out.astype(np.float64) - (90 + c * 255)).max() <= 1
    coloured = np.array([[[[200, 100, 50]]]], dtype=np.uint8)  # value 200/255; hue and saturation stay
    out = corrupt(coloured, "brightness", 1, params="cifar")[0, 0, 0].astype(np.float64)
    assert out[0] == pytest.approx(200 + 0.05 * 255, abs=1)
    assert out[1] / out[0] == pytest.approx(0.5, abs=0.01) and out[2] / out[0] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("params", ["cifar", "imagenet"])
def test_contrast_is_the_affine_map_to_the_mean(params: str) -> None:
    clean = scenes(3, 32 if params == "cifar" else 96, seed=7)
    xf = clean / 255.0
    means = xf.mean(axis=(1, 2), keepdims=True)
    for s, c in enumerate(TABLES[params]["contrast"], start=1):
        expected = np.floor(np.clip((xf - means) * c + means, 0, 1) * 255)
        diff = np.abs(corrupt(clean, "contrast", s) - expected)
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_pixelate_is_blocky_at_the_table_factor() -> None:
    clean = scenes(2, 96, seed=8)
    for s, block in ((2, 2), (5, 4)):  # ImageNet factors 0.5 and 0.25: 48 and 24 px, blown up to 96
        assert IMAGENET["pixelate"][s - 1] == 1 / block
        out = corrupt(clean, "pixelate", s)
        assert np.array_equal(out, np.repeat(np.repeat(out[:, ::block, ::block], block, 1), block, 2))
        means = clean.reshape(2, 96 // block, block, 96 // block, block, 3).mean(axis=(2, 4))
        assert np.abs(out[:, ::block, ::block] - means).max() <= 1
    small = corrupt(scenes(1, 32), "pixelate", 5)  # CIFAR factor 0.65: 20 px of detail left in 32
    assert len(np.unique(small[0, 16, :, 0])) <= 20


@pytest.mark.parametrize("params", ["cifar", "imagenet"])
def test_jpeg_equals_pil_at_the_table_quality(params: str) -> None:
    clean = scenes(2, 32 if params == "cifar" else 96, seed=9)
    for s, quality in enumerate(TABLES[params]["jpeg_compression"], start=1):
        out = corrupt(clean, "jpeg_compression", s)
        for image, got in zip(clean, out):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=quality)
            assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))


def test_glass_blur_copies_a_neighbour_as_the_reference_swap_does() -> None:
    """CIFAR severity 1 blurs with sigma 0.05 (an identity), so only the shuffle shows: each visited pixel takes the
    value of (h + dy, w + dx), dx, dy in {-1, 0}, and that neighbour keeps its own (numpy's tuple 'swap' of views)."""
    clean = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    out = corrupt(clean, "glass_blur", 1, seed=3)
    for n in range(2):
        for h in range(2, 32):
            for w in range(2, 32):
                here = out[n, h, w]
                assert any(np.array_equal(here, clean[n, h - dy, w - dx]) for dy in (0, 1) for dx in (0, 1))
    assert np.array_equal(out[:, :2], clean[:, :2]) and np.array_equal(out[:, :, :2], clean[:, :, :2])
    moved = ~np.all(out == clean, axis=-1)
    assert 0.5 < moved[:, 2:, 2:].mean() < 0.9  # three of four draws move a pixel
    lost = {tuple(p) for p in clean[0].reshape(-1, 3)} - {tuple(p) for p in out[0].reshape(-1, 3)}
    assert lost, "a swap would keep every value; the reference's copy loses some"


@pytest.mark.parametrize("severity", [1, 5])
def test_motion_blur_streaks_a_dot_with_the_half_gaussian_kernel(severity: int) -> None:
    radius, sigma = CIFAR["motion_blur"][severity - 1]
    taps = np.arange(2 * int(np.ceil(radius)) + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    dot = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    dot[:, 16, 16] = 255
    out = corrupt(dot, "motion_blur", severity, seed=1).astype(np.float64)
    assert np.all(out[:, 16, 16] == np.round(255 / weights.sum()))  # tap 0 reads the pixel itself
    assert np.all(np.abs(out.sum(axis=(1, 2)) - 255) <= len(taps) / 2)  # the weights sum to one
    assert np.all(out[:, :, 17:] == 0)  # taps read to the right (|angle| <= 45), so the streak runs left
    assert np.all(np.count_nonzero(out[..., 0], axis=(1, 2)) <= len(taps))


@pytest.mark.parametrize("name", ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"])
def test_blurs_keep_a_flat_image_flat(name: str) -> None:
    for s in (1, 5):
        out = corrupt(grey(137, n=2), name, s, seed=1)
        assert np.abs(out.astype(int) - 137).max() <= 1


def test_grayscale_keeps_one_channel() -> None:
    rgb = scenes(2, 32)
    gray = rgb[..., :1].copy()
    for name in CORRUPTIONS:
        out = corrupt(gray, name, 3, seed=1)
        assert out.shape == gray.shape and out.dtype == np.uint8
    replicated = corrupt(np.repeat(gray, 3, axis=3), "contrast", 2)
    assert np.array_equal(corrupt(gray, "contrast", 2), replicated[..., :1])


def test_auto_picks_the_table_by_size() -> None:
    small, large = scenes(1, 32), scenes(1, 96)
    assert np.array_equal(corrupt(small, "contrast", 1), corrupt(small, "contrast", 1, params="cifar"))
    assert np.array_equal(corrupt(large, "contrast", 1), corrupt(large, "contrast", 1, params="imagenet"))
    assert not np.array_equal(corrupt(large, "contrast", 1), corrupt(large, "contrast", 1, params="cifar"))


def test_frost_uses_a_folder_of_photographs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in range(2):
        Image.fromarray(np.full((80, 90, 3), (200, 40 + k * 100, 10), dtype=np.uint8)).save(tmp_path / f"f{k}.png")
    clean = scenes(6, 32)
    c0, c1 = CIFAR["frost"][2]
    out = corrupt(clean, "frost", 3, seed=2, frost_dir=tmp_path).astype(np.float64)
    expect_r = np.floor(np.clip(c0 * clean[..., 0] + c1 * 200, 0, 255))
    assert np.abs(out[..., 0] - expect_r).max() <= 1
    greens = [float(np.median(out[i, ..., 1] - c0 * clean[i, ..., 1])) / c1 for i in range(6)]
    assert all(min(abs(g - 40), abs(g - 140)) < 4 for g in greens)
    assert min(greens) < 90 < max(greens)  # both photographs are drawn
    monkeypatch.setenv("CONVFORGE_FROST_DIR", str(tmp_path))
    assert np.array_equal(corrupt(clean, "frost", 3, seed=2), out)
    monkeypatch.delenv("CONVFORGE_FROST_DIR")
    assert not np.array_equal(corrupt(clean, "frost", 3, seed=2), out)  # the procedural texture
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        corrupt(clean, "frost", 1, frost_dir=tmp_path / "empty")


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity_names_the_choices(severity: object) -> None:
    with pytest.raises(ConfigError, match=r"1, 2, 3, 4, 5") as err:
        corrupt(scenes(1, 32), "fog", severity)  # type: ignore[arg-type]
    assert repr(severity) in str(err.value)


def test_bad_name_params_and_images() -> None:
    with pytest.raises(ConfigError, match="gaussian_noise.*jpeg_compression") as err:
        corrupt(scenes(1, 32), "speckle_noise", 1)
    assert "'speckle_noise'" in str(err.value)
    with pytest.raises(ConfigError, match="auto, cifar, imagenet"):
        corrupt(scenes(1, 32), "fog", 1, params="tiny")
    with pytest.raises(ConfigError, match="seed"):
        corrupt(scenes(1, 32), "fog", 1, seed=-1)
    with pytest.raises(DataError, match="uint8"):
        corrupt(scenes(1, 32).astype(np.float32), "fog", 1)
    with pytest.raises(DataError, match="uint8"):
        corrupt(scenes(1, 32)[..., :2], "fog", 1)
