"""Segmentation: the models (fully convolutional at any size), metrics on hand-built masks, losses,
joint augmentation and its loader, ``segfolder`` data, and the inspection helpers."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, SHARED, save_image
from PIL import Image

from convforge.data import Split, load
from convforge.data.joint_augment import (
    SegmentationLoader,
    apply_joint,
    draw_params,
    joint_augment,
)
from convforge.data.loader import normalize
from convforge.data.segfolder import (
    SegDataset,
    decode_mask,
    load_segfolder,
    parse_classes_file,
)
from convforge.errors import ConfigError, DataError
from convforge.inspect.segmentation import (
    CAMVID_CLASSES,
    CAMVID_COLOURS,
    colorize,
    default_palette,
    overlay,
    palette_for,
    save_mask,
    segment_image,
)
from convforge.measure import count_params
from convforge.measure.segmentation import (
    confusion_matrix,
    evaluate_segmentation,
    segmentation_scores,
)
from convforge.models import create_model, list_models, model_info
from convforge.models._segment import resnet_encoder, resnet_stages
from convforge.train.losses import segmentation_loss, soft_dice_loss

SEG_FAMILIES = {"fcn", "deeplab", "linknet", "unet"}
SEG_MODELS = [name for name in list_models() if model_info(name).family in SEG_FAMILIES]
# Narrower settings for the biggest ones, so that the shape test stays fast (the architecture is the same).
FAST_ARGS = {f"fcn{s}s_vgg16": {"fc_width": 64, "fc6_kernel": 3} for s in (8, 16, 32)} | {"unet": {"base_width": 16}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors on a shared 2-core machine: one thread (conftest restores the count)."""
    torch.set_num_threads(1)


# --- models -------------------------------------------------------------------------------------------


def test_every_segmentation_family_is_registered():
    assert {model_info(n).family for n in SEG_MODELS} == SEG_FAMILIES
    assert {"fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "fcn8s_resnet18", "fcn32s_resnet50",
            "deeplabv3_resnet50", "deeplabv3_resnet18", "linknet_resnet18", "unet"} <= set(SEG_MODELS)


@pytest.mark.parametrize("name", SEG_MODELS)
def test_fully_convolutional_at_any_size(name):
    model = create_model(name, num_classes=5, **FAST_ARGS.get(name, {})).eval()
    assert model.task == "segment" and model.num_classes == 5
    assert model_info(name).input_size in ((3, 180, 240), (3, 224, 224))
    with torch.no_grad():
        for size in ((65, 97), (180, 240)):
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 5, *size), (name, size)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,kwargs", [("linknet_resnet18", {}), ("deeplabv3_resnet18", {"output_stride": 8}),
                                         ("fcn8s_resnet18", {}), ("unet", {"base_width": 8})])
def test_train_step_gradients_reach_the_encoder(name, kwargs):
    model = create_model(name, num_classes=3, in_chans=1, **kwargs).train()
    x = torch.randn(2, 1, 37, 45)
    masks = torch.randint(0, 3, (2, 37, 45))
    masks[:, :5] = 255
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # FCN's score layers start at zero (as in the paper): the encoder learns from step 2
        optimizer.zero_grad()
        loss = segmentation_loss(model(x), masks, ignore_index=255, dice_weight=0.5)
        loss.backward()
        optimizer.step()
    first = next(p for p in model.parameters() if p.ndim == 4)
    assert torch.isfinite(loss) and first.grad is not None and first.grad.abs().sum() > 0


def test_parameter_counts_against_the_papers():
    def params(name, **kwargs):
        with torch.device("meta"):
            return count_params(create_model(name, **kwargs))

    # LinkNet reports 11.5 M; FCN-VGG16 134 M (21 classes); U-Net 31.0 M (2 classes, BN variant).
    assert abs(params("linknet_resnet18") - 11.5e6) / 11.5e6 < 0.01
    for stride in (32, 16, 8):
        assert abs(params(f"fcn{stride}s_vgg16") - 134e6) / 134e6 < 0.005
    assert params("unet") == 31_037_698
    assert params("unet", base_width=32) < params("unet") / 3.9
    assert params("fcn8s_vgg16", fc_width=1024, fc6_kernel=3) < 21e6
    # The dilated ResNet has exactly the parameters of the plain one: DeepLab = ResNet-50 trunk + ASPP + classifier.
    trunk = params("resnet50") - (2048 * 1000 + 1000)
    aspp = 2048 * 256 * (1 + 9 * 3 + 1) + 1280 * 256 + 6 * 2 * 256  # convolutions + BatchNorm
    assert params("deeplabv3_resnet50") == trunk + aspp + 256 * 21 + 21


def test_dilated_resnet_output_stride_and_unchanged_default():
    plain = create_model("resnet18", num_classes=4)
    dilated = resnet_encoder(18, output_stride=8)
    plain_keys = [k for k in plain.state_dict() if not k.startswith("fc.")]
    assert list(dilated.state_dict()) == plain_keys  # the same parameters, under the same names
    assert plain.layer4[0].conv1.dilation == (1, 1) and plain.layer4[0].conv1.stride == (2, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for stride, expected in ((32, 2), (16, 4), (8, 8)):
            encoder = resnet_encoder(18, output_stride=stride).eval()
            assert resnet_stages(encoder, x)[-1].shape[-1] == expected
        # dilation changes the receptive field, not the weights: plain weights load into the dilated trunk
        dilated.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("fc.")})
    deeplab = create_model("deeplabv3_resnet50", num_classes=3, output_stride=8)
    assert deeplab.backbone.layer4[1].conv2.dilation == (4, 4) and deeplab.backbone.layer3[1].conv2.dilation == (2, 2)
    assert [b[0].dilation for b in deeplab.aspp.branches[1:4]] == [(12, 12), (24, 24), (36, 36)]
    with pytest.raises(ConfigError, match="output_stride"):
        create_model("deeplabv3_resnet18", output_stride=4)


@pytest.mark.parametrize("name,kwargs", [("linknet_resnet18", {}), ("deeplabv3_resnet18", {}), ("unet", {"base_width": 8})])
def test_fuse_keeps_the_output(name, kwargs):
    model = create_model(name, num_classes=3, **kwargs).eval()
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():  # non-trivial statistics, so that folding has something to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(1, 3, 45, 61, generator=gen)
    with torch.no_grad():
        before = model(x)
        after = model.fuse()(x)
    assert torch.allclose(before, after, atol=1e-4 * float(before.abs().max()))
    # only BatchNorms after transposed convolutions (LinkNet's decoder) may remain
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert left == (5 if name == "linknet_resnet18" else 0)


def test_onnx_export_parity(tmp_path):
    from convforge.export.onnx import to_onnx

    model = create_model("unet", num_classes=3, base_width=8)
    report = to_onnx(model, tmp_path / "unet.onnx", (3, 37, 50), dynamic_batch=True)
    assert report["max_abs_diff"] < 1e-4


# --- metrics --------------------------------------------------------------------------------------------

IGNORE = 255
# 2x4 masks; the pixel at (1, 2) is ignored (its prediction, 7, is out of range and must not matter).
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 7, 2]])


def test_confusion_matrix_by_hand():
    confusion = confusion_matrix(PRED, TARGET, 3, IGNORE)
    # rows = target, columns = prediction, over the 7 labelled pixels
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert confusion.dtype == torch.long
    with pytest.raises(ValueError, match="target value 3"):
        confusion_matrix(PRED.clamp(max=2), torch.full_like(TARGET, 3), 3, IGNORE)


def test_scores_by_hand():
    scores = segmentation_scores(confusion_matrix(PRED, TARGET, 3, IGNORE))
    assert scores["pixel_acc"] == pytest.approx(100 * 4 / 7)  # 4 of 7 labelled pixels right
    assert scores["mean_acc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    # IoU: class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 3 - 2); class 2: 1 / (2 + 2 - 1)
    assert scores["per_class_iou"] == pytest.approx([100 / 3, 50.0, 100 / 3])
    assert scores["miou"] == pytest.approx(100 * 7 / 18)


def test_absent_classes_and_classes_only_predicted():
    # A fourth class absent from both: IoU None, mIoU unchanged.
    four = segmentation_scores(confusion_matrix(PRED, TARGET, 4, IGNORE))
    assert four["per_class_iou"][3] is None and four["miou"] == pytest.approx(100 * 7 / 18)
    # Class 3 predicted once (for a class-1 pixel) but never true: IoU 0, and it counts in mIoU.
    pred = PRED.clone()
    pred[1, 3] = 3
    scores = segmentation_scores(confusion_matrix(pred, TARGET, 4, IGNORE))
    # class 2 loses its false positive: 1 / (2 + 1 - 1); class 1 keeps 2 / (3 + 3 - 2)
    assert scores["per_class_iou"] == pytest.approx([100 / 3, 50.0, 50.0, 0.0])
    assert scores["miou"] == pytest.approx(100 / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 4 / 7)
    assert scores["mean_acc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)  # over classes in the target


def test_overlapping_squares():
    # 8x8: the true square is rows 0-3, columns 0-3; the predicted one is shifted right by 2.
    target = torch.zeros(8, 8, dtype=torch.long)
    pred = torch.zeros(8, 8, dtype=torch.long)
    target[:4, :4] = 1
    pred[:4, 2:6] = 1
    scores = segmentation_scores(confusion_matrix(pred, target, 2, IGNORE))
    # square: overlap 4x2 = 8, union 16 + 16 - 8 = 24; background: 40 / (48 + 48 - 40) = 5/7
    assert scores["per_class_iou"] == pytest.approx([100 * 5 / 7, 100 / 3])
    assert scores["miou"] == pytest.approx(100 * 11 / 21)
    assert scores["pixel_acc"] == pytest.approx(75.0)  # 40 + 8 of 64
    # ignoring the whole predicted-only strip (columns 4-5 of rows 0-3) removes its false positives
    target[:4, 4:6] = IGNORE
    scores = segmentation_scores(confusion_matrix(pred, target, 2, IGNORE))
    assert scores["per_class_iou"][1] == pytest.approx(50.0)  # 8 / (16 + 8 - 8)


class _ColourModel(torch.nn.Module):
    """Reads the class from the image: class c was painted with value 60 * c (mean 0, std 1 normalisation)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        value = x[:, :1] * 255
        centres = torch.arange(self.num_classes, dtype=x.dtype).view(1, -1, 1, 1) * 60
        return -self.scale * (value - centres).square() / 100


class _ClassZeroModel(torch.nn.Module):
    """Logits (1, 0, 0) everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, x):
        return self.bias.view(1, 3, 1, 1).expand(x.shape[0], 3, *x.shape[-2:])


def _painted_split(num=5, size=(6, 9), num_classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, num_classes, (num, *size), generator=gen)
    images = (masks * 60).to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()
    return Split(images, masks)


def test_evaluate_segmentation_perfect_and_ignored():
    split = _painted_split(num_classes=3)
    split.labels[:, 0] = IGNORE
    result = evaluate_segmentation(_ColourModel(4), split, (0, 0, 0), (1, 1, 1), num_classes=4,
                                   ignore_index=IGNORE, batch_size=2)
    assert result["pixel_acc"] == 100.0 and result["miou"] == 100.0
    assert result["per_class_iou"][:3] == [100.0] * 3 and result["per_class_iou"][3] is None
    assert result["images"] == 5 and result["images_per_s"] > 0 and result["loss"] < 1e-3
    # a model that always says class 0: IoU of class 0 = its pixels / all labelled pixels
    result = evaluate_segmentation(_ClassZeroModel(), split, (0, 0, 0), (1, 1, 1), num_classes=3, ignore_index=IGNORE)
    labelled = split.labels[split.labels != IGNORE]
    share = 100.0 * float((labelled == 0).float().mean())
    assert result["pixel_acc"] == pytest.approx(share)
    assert result["per_class_iou"] == pytest.approx([share, 0.0, 0.0])
    # logits (1, 0, 0): cross-entropy log(e + 2) - 1 on class-0 pixels, log(e + 2) on the others
    assert result["loss"] == pytest.approx(math.log(math.e + 2) - share / 100, rel=1e-5)


# --- losses ----------------------------------------------------------------------------------------------


def test_segmentation_loss_is_cross_entropy_over_labelled_pixels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=gen)
    masks = torch.randint(0, 4, (2, 5, 6), generator=gen)
    masks[0, 0] = IGNORE
    keep = masks != IGNORE
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep])
    assert segmentation_loss(logits, masks, IGNORE) == pytest.approx(float(expected), rel=1e-6)
    # all ignored: 0, not NaN, and still differentiable
    logits.requires_grad_(True)
    loss = segmentation_loss(logits, torch.full_like(masks, IGNORE), IGNORE, dice_weight=1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(logits.grad).all()


def test_dice_loss_sanity():
    gen = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 3, (2, 8, 8), generator=gen)
    masks[:, :2] = IGNORE
    perfect = 30.0 * F.one_hot(masks.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    assert float(soft_dice_loss(perfect, masks, IGNORE)) < 1e-3
    wrong = 30.0 * F.one_hot((masks.clamp(max=2) + 1) % 3, 3).permute(0, 3, 1, 2).float()
    assert float(soft_dice_loss(wrong, masks, IGNORE)) > 0.95
    # ignored pixels count nowhere: changing their logits changes nothing
    changed = perfect.clone()
    changed[:, :, :2] = torch.randn(2, 3, 2, 8, generator=gen) * 50
    assert float(soft_dice_loss(changed, masks, IGNORE)) == pytest.approx(float(soft_dice_loss(perfect, masks, IGNORE)))
    combined = segmentation_loss(perfect, masks, IGNORE, dice_weight=2.0)
    assert float(combined) < 1e-3


# --- joint augmentation -------------------------------------------------------------------------------------


def _label(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return (rows // 3 * 5 + cols // 4) % 7


def _coordinate_batch(n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose channels hold (row, column, 1) and masks that are a function of (row, column)."""
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    image = torch.stack([rows, cols, torch.ones(h, w)])
    return image.expand(n, -1, -1, -1).clone(), _label(rows.long(), cols.long()).expand(n, -1, -1).clone()


def test_joint_augment_keeps_image_and_mask_aligned():
    images, masks = _coordinate_batch(16, 30, 50)
    gen = torch.Generator().manual_seed(0)
    out_images, out_masks = joint_augment(images, masks, scales=(0.5, 2.0), crop=(24, 40), flip=True,
                                          generator=gen, ignore_index=IGNORE)
    assert out_images.shape == (16, 3, 24, 40) and out_masks.shape == (16, 24, 40) and out_masks.dtype == torch.long
    inside = out_masks != IGNORE
    # Padding is aligned: the image's constant channel is 1 exactly where the mask is labelled, 0 elsewhere.
    assert torch.equal((out_images[:, 2] - 1).abs() < 1e-5, inside) and (out_images[:, 2][~inside] == 0).all()
    assert (~inside).any() and inside.any()  # some crops leave the scaled-down images
    # Every labelled mask pixel is the label of the image pixel's (interpolated) coordinates.
    rows, cols = out_images[:, 0][inside], out_images[:, 1][inside]
    tie = ((rows - rows.floor() - 0.5).abs() < 1e-3) | ((cols - cols.floor() - 0.5).abs() < 1e-3)
    decoded = _label(torch.floor(rows + 0.5).long(), torch.floor(cols + 0.5).long())
    assert (decoded == out_masks[inside])[~tie].all()
    assert tie.float().mean() < 0.2
    # both flipped and unflipped samples, and scales both ways
    steps = out_images[:, 1, :, 1:] - out_images[:, 1, :, :-1]
    centre = out_masks[:, 12, 20] != IGNORE
    assert ((steps[:, 12, 20] < 0) & centre).any() and ((steps[:, 12, 20] > 0) & centre).any()
    assert (steps.abs().amax(dim=(1, 2)) > 1.2).any() and (steps[:, 12, 20].abs() < 0.8).any()


def test_joint_augment_at_scale_one_is_an_exact_crop_and_flip():
    images, masks = _coordinate_batch(8, 20, 30)
    gen = torch.Generator().manual_seed(3)
    params = draw_params(8, (20, 30), scales=(1.0, 1.0), crop=(12, 35), flip=True, generator=gen)
    out_images, out_masks = apply_joint(images, masks, params, (12, 35), IGNORE)
    for i in range(8):
        top, left = params.offset[i].tolist()
        assert 0 <= top <= 8 and -5 <= left <= 0  # crop inside the rows, wider than the columns
        expected = F.pad(images[i], (-left, 35 - 30 + left, 0, 0))[:, top:top + 12]
        expected_mask = F.pad(masks[i], (-left, 35 - 30 + left), value=IGNORE)[top:top + 12]
        if params.flip[i]:
            expected, expected_mask = expected.flip(-1), expected_mask.flip(-1)
        # bilinear sampling at pixel centres: the source pixels, up to float rounding; masks exactly
        assert torch.allclose(out_images[i], expected, atol=1e-4) and torch.equal(out_masks[i], expected_mask)
    assert params.flip.any() and not params.flip.all()


def _seg_split(num=10, size=(16, 20), seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num, 3, *size), generator=gen, dtype=torch.uint8)
    masks = torch.randint(0, 4, (num, *size), generator=gen, dtype=torch.uint8)
    return Split(images, masks)


def _collect(loader, start=0):
    out = []
    for x, y in loader.iter_from(start):
        out.append((x.clone(), y.clone(), loader.last_indices.clone()))
    return out


def test_loader_is_deterministic_and_resumes():
    split = _seg_split()
    kwargs = {"shuffle": True, "augment": "scale-crop-flip", "crop": 12, "seed": 3, "ignore_index": IGNORE}
    loader = SegmentationLoader(split, 3, (0.5,) * 3, (0.25,) * 3, **kwargs)
    loader.set_epoch(2)
    first = _collect(loader)
    assert len(first) == len(loader) == 4
    x, y, idx = first[0]
    assert x.shape == (3, 3, 12, 12) and x.dtype == torch.float32 and y.shape == (3, 12, 12) and y.dtype == torch.long
    again = SegmentationLoader(split, 3, (0.5,) * 3, (0.25,) * 3, **kwargs)
    again.set_epoch(2)
    resumed = _collect(again, start=2)
    for a, b in zip(first[2:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert len(resumed) == 2
    loader.set_epoch(3)
    other = _collect(loader)
    assert not torch.equal(other[0][2], first[0][2]) or not torch.equal(other[0][0], first[0][0])
    # Draws are per sample: two ranks of batch 2 see the same augmented samples as one rank of batch 4.
    single = SegmentationLoader(split, 4, (0.5,) * 3, (0.25,) * 3, **kwargs)
    single.set_epoch(5)
    whole = {int(i): (x[k], y[k]) for x, y, idx in _collect(single) for k, i in enumerate(idx)}
    for rank in range(2):
        part = SegmentationLoader(split, 2, (0.5,) * 3, (0.25,) * 3, rank=rank, world_size=2, **kwargs)
        part.set_epoch(5)
        for x, y, idx in _collect(part):
            for k, i in enumerate(idx):
                assert torch.equal(x[k], whole[int(i)][0]) and torch.equal(y[k], whole[int(i)][1])


def test_loader_without_augmentation_and_bad_options():
    split = _seg_split(num=5)
    loader = SegmentationLoader(split, 2, (0.5,) * 3, (0.25,) * 3)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [2, 2, 1]
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(x, normalize(split.images, (0.5,) * 3, (0.25,) * 3))
    assert torch.equal(torch.cat([b[1] for b in batches]), split.labels.long())
    flipped = SegmentationLoader(split, 5, (0.5,) * 3, (0.25,) * 3, augment="flip", seed=1)
    fx, fy = next(iter(flipped))
    for i in range(5):  # each sample is either untouched or mirrored, image and mask together
        same = torch.equal(fy[i], split.labels[i].long())
        assert same or torch.equal(fy[i], split.labels[i].long().flip(-1))
        assert torch.allclose(fx[i], x[i] if same else x[i].flip(-1))
    with pytest.raises(ConfigError, match="augment"):
        SegmentationLoader(split, 2, (0.5,), (0.2,), augment="crop-flip-rotate")
    with pytest.raises(ConfigError, match="masks"):
        SegmentationLoader(Split(split.images, torch.zeros(5, dtype=torch.long)), 2, (0.5,), (0.2,))


def test_split_accepts_masks():
    images = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)
    assert Split(images, torch.zeros(2, 4, 5, dtype=torch.uint8)).has_masks
    assert not Split(images, torch.zeros(2, dtype=torch.long)).has_masks
    with pytest.raises(ValueError, match="masks of shape"):
        Split(images, torch.zeros(2, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="uint8 or int64"):
        Split(images, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="labels of shape"):
        Split(images, torch.zeros(3, dtype=torch.long))


# --- segfolder ---------------------------------------------------------------------------------------------

CLASSES_TXT = "# three classes and a void label\n0 road\n1 car\n2 sky tree\n\n3 void (ignore)\n"


def make_segfolder(root: Path, splits=None, size=(12, 16), num_classes=3, ignore=3, classes_txt=CLASSES_TXT, seed=0):
    """``root/<split>/{images,masks}/f<i>.png`` and ``classes.txt``; returns {split: [(image, mask)]}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes_txt)
    written = {}
    for split, count in (splits or {"train": 4, "test": 2}).items():
        items = []
        for i in range(count):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            mask = rng.integers(0, num_classes, size, dtype=np.uint8)
            mask[0, :2] = ignore
            save_image(root / split / "images" / f"f{i:02d}.png", image)
            save_image(root / split / "masks" / f"f{i:02d}.png", mask)
            items.append((image, mask))
        written[split] = items
    return written


def test_segfolder_loads_and_caches(tmp_path):
    written = make_segfolder(tmp_path / "seg", {"train": 4, "val": 2, "test": 3})
    messages = []
    data = load_segfolder(tmp_path / "seg", cache_dir=tmp_path / "cache", log=messages.append)
    assert isinstance(data, SegDataset) and data.task == "segment"
    assert data.classes == ["road", "car", "sky tree"] and data.num_classes == 3 and data.ignore_index == 3
    assert data.image_size == (12, 16) and data.channels == 3 and data.default_augment == "scale-crop-flip"
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 3)
    for split in ("train", "val", "test"):
        got = data.split(split)
        assert got.has_masks and got.labels.dtype == torch.uint8
        for i, (image, mask) in enumerate(written[split]):
            assert torch.equal(got.images[i], torch.from_numpy(image).permute(2, 0, 1))
            assert torch.equal(got.labels[i], torch.from_numpy(mask))
    assert data.describe()["ignore_index"] == 3 and data.describe()["test"] == 3
    expected_mean = data.train.images.double().div(255).mean(dim=(0, 2, 3))
    assert data.mean == pytest.approx(expected_mean.tolist(), abs=1e-6)
    assert len(messages) == 1 and "decoding 9 image/mask pairs" in messages[0]
    again = load_segfolder(tmp_path / "seg", cache_dir=tmp_path / "cache", log=messages.append)
    assert len(messages) == 1 and torch.equal(again.test.labels, data.test.labels)  # from the cache
    assert again.mean == pytest.approx(data.mean)
    via_spec = load(f"segfolder:{tmp_path / 'seg'}", cache_dir=tmp_path / "cache")
    assert isinstance(via_spec, SegDataset) and via_spec.spec == f"segfolder:{tmp_path / 'seg'}"


def test_segfolder_palette_masks_and_gray_images(tmp_path):
    root = tmp_path / "seg"
    make_segfolder(root, {"train": 2, "val": 1})
    indices = np.array([[0, 1, 2, 3]] * 12, dtype=np.uint8).repeat(4, axis=1)
    picture = Image.fromarray(indices)
    picture.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200, 0, 0, 0] + [0] * (256 * 3 - 12))
    picture.save(root / "val" / "masks" / "f00.png")  # a palette PNG: its indices are the classes
    save_image(root / "train" / "images" / "f01.png", np.full((12, 16), 77, dtype=np.uint8))  # grayscale
    data = load_segfolder(root, cache_dir=tmp_path / "cache")
    assert torch.equal(data.test.labels[0], torch.from_numpy(indices))
    assert (data.train.images[1] == 77).all() and data.channels == 3
    assert any("grayscale" in note for note in data.notes)
    assert data.val is None  # like imagefolder: val/ alone is the evaluation split


@pytest.mark.parametrize("text,classes,ignore", [
    ("0 a\n1 b\nignore: 11\n", ["a", "b"], 11),
    ("0 a\n1 b\n", ["a", "b"], 255),
    ("# c\n 0  a b \n1 IGNORED\nignore: 1\n", ["a b"], 1),
])
def test_classes_file_formats(tmp_path, text, classes, ignore):
    (tmp_path / "classes.txt").write_text(text)
    assert parse_classes_file(tmp_path / "classes.txt") == (classes, ignore)


@pytest.mark.parametrize("text,match", [
    ("0 a\n2 b\n", r"0\.\.1 without gaps.*missing 1"),
    ("0 a\n0 b\n", "named twice"),
    ("0 a\nb\n", "line 2: expected 'INDEX NAME'"),
    ("0 a\n1 b (ignore)\nignore: 7\n", "more than one ignore index"),
    ("0 a\nignore: 0\n", "also the class"),
    ("# nothing\n", "names no classes"),
])
def test_classes_file_errors(tmp_path, text, match):
    (tmp_path / "classes.txt").write_text(text)
    with pytest.raises(DataError, match=match):
        parse_classes_file(tmp_path / "classes.txt")


def test_segfolder_errors_name_the_file(tmp_path):
    root = tmp_path / "seg"
    make_segfolder(root)
    cache = tmp_path / "cache"
    (root / "train" / "masks" / "f01.png").unlink()
    with pytest.raises(DataError, match=r"image .*train/images/f01\.png has no mask: expected .*train/masks/f01\.png"):
        load_segfolder(root, cache_dir=cache)
    save_image(root / "train" / "masks" / "f01.png", np.full((12, 16), 9, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train/masks/f01\.png \(value 9\).*names 3 classes"):
        load_segfolder(root, cache_dir=cache)
    save_image(root / "train" / "masks" / "f01.png", np.zeros((12, 16), dtype=np.uint8))
    save_image(root / "test" / "masks" / "extra.png", np.zeros((12, 16), dtype=np.uint8))
    with pytest.raises(DataError, match=r"mask .*test/masks/extra\.png has no image"):
        load_segfolder(root, cache_dir=cache)
    (root / "test" / "masks" / "extra.png").unlink()
    save_image(root / "test" / "masks" / "f00.png", (np.zeros((12, 16, 3)) + [1, 2, 0]).astype(np.uint8))
    with pytest.raises(DataError, match=r"test/masks/f00\.png.*single-channel.*RGB"):
        load_segfolder(root, cache_dir=cache)
    save_image(root / "test" / "masks" / "f00.png", np.zeros((10, 16), dtype=np.uint8))
    with pytest.raises(DataError, match=r"f00\.png is 16x12 \(WxH\) but its mask .* is 16x10"):
        load_segfolder(root, cache_dir=cache)
    assert not (cache / "segfolder").exists() or not any((cache / "segfolder").iterdir())  # nothing half-written
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt not found"):
        load_segfolder(root, cache_dir=cache)


def test_segfolder_sizes_differ_and_image_size(tmp_path):
    root = tmp_path / "seg"
    make_segfolder(root)
    rng = np.random.default_rng(5)
    save_image(root / "train" / "images" / "f03.png", rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    big_mask = np.zeros((24, 40), dtype=np.uint8)
    big_mask[:, 20:] = 2
    big_mask[:2] = 3  # the ignore value survives nearest-neighbour resizing
    save_image(root / "train" / "masks" / "f03.png", big_mask)
    with pytest.raises(DataError, match=r"differ in size.*--image-size"):
        load_segfolder(root, cache_dir=tmp_path / "cache")
    data = load_segfolder(root, image_size=(12, 16), cache_dir=tmp_path / "cache")
    assert data.image_size == (12, 16)
    resized = data.train.labels[3]
    assert set(resized.unique().tolist()) <= {0, 2, 3}  # nearest: no blended labels
    # 24x40 -> cover 12x16 at scale 0.5 (12x20), centre crop of columns 2..17: the class-2 half starts at column 8
    assert (resized[0] == 3).all() and (resized[1:, :8] == 0).all() and (resized[1:, 8:] == 2).all()
    # a direct call with an int size
    assert load_segfolder(root, image_size=8, cache_dir=tmp_path / "cache").image_size == (8, 8)


def test_segfolder_spec_errors(tmp_path):
    with pytest.raises(DataError, match="segfolder:DIR"):
        load("no-such-kind:x")
    with pytest.raises(DataError, match="needs a directory"):
        load("segfolder:")
    make_segfolder(tmp_path / "seg")
    with pytest.raises(DataError, match="use segfolder:"):
        load(str(tmp_path / "seg"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "classes.txt").write_text("0 a\n")
    with pytest.raises(DataError, match="no train/, val/ or test/"):
        load(f"segfolder:{tmp_path / 'empty'}")


# --- inspection ------------------------------------------------------------------------------------------------


def test_segment_colorize_overlay_and_save(tmp_path):
    split = _painted_split(num=1, size=(7, 11), num_classes=3)
    image, truth = split.images[0], split.labels[0]
    mask = segment_image(_ColourModel(3), image, (0, 0, 0), (1, 1, 1))
    assert mask.dtype == torch.uint8 and torch.equal(mask.long(), truth)
    camvid = palette_for(list(CAMVID_CLASSES))
    assert camvid[:11].tolist() == [list(c) for c in CAMVID_COLOURS]
    assert torch.equal(palette_for(["a", "b"]), default_palette())
    assert len({tuple(c) for c in default_palette().tolist()}) == 256
    colours = colorize(mask, camvid)
    assert colours.shape == (3, 7, 11) and colours.dtype == torch.uint8
    assert torch.equal(colours[:, 0, 0], camvid[int(mask[0, 0])])
    assert torch.equal(overlay(image, mask, alpha=0.0), image)
    assert torch.equal(overlay(image, mask, alpha=1.0, palette=camvid), colours)
    half = overlay(image[:1], mask, alpha=0.5, ignore_index=int(mask[0, 0]))
    assert half.shape == (3, 7, 11) and torch.equal(half[:, 0, 0], image[:, 0, 0])
    path = save_mask(tmp_path / "mask.png", mask, camvid)
    assert torch.equal(torch.from_numpy(decode_mask(str(path))), mask)


# --- CamVid-240 (research data, absent from most checkouts) ------------------------------------------------------

CAMVID_TAR = SHARED / "datasets" / "camvid-half.tar.gz"


@pytest.fixture(scope="module")
def camvid_root(tmp_path_factory) -> Path:
    local = REPO.parent / "data" / "camvid"
    if (local / "classes.txt").is_file():
        return local
    if not CAMVID_TAR.is_file():
        pytest.skip(f"CamVid is absent ({local} and {CAMVID_TAR})")
    target = tmp_path_factory.mktemp("camvid")
    with tarfile.open(CAMVID_TAR, "r:gz") as archive:
        archive.extractall(target, filter="data")
    return target / "camvid"


@pytest.mark.shared
def test_camvid_loads(camvid_root, tmp_path):
    data = load(f"segfolder:{camvid_root}", cache_dir=tmp_path / "cache")
    assert (len(data.train), len(data.val), len(data.test)) == (367, 101, 233)
    assert len(data.train) + len(data.val) + len(data.test) == 701
    assert data.num_classes == 11 and data.ignore_index == 11 and data.classes[0] == "Sky"
    assert data.image_size == (180, 240) and data.channels == 3
    assert int(data.train.labels.max()) == 11 and torch.equal(palette_for(data.classes)[3], torch.tensor([128, 64, 128],
                                                                                                          dtype=torch.uint8))
