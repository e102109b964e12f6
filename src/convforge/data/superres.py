"""Super-resolution data: HR luma patches for training, benchmark sets, bicubic pairs and colour conversions.

The protocol is that of SRCNN's MATLAB code, which later papers kept: images are reduced to the Y
channel of MATLAB's ``rgb2ycbcr`` (uint8), cropped to a multiple of the scale, downscaled and
upscaled with MATLAB's bicubic ``imresize`` (``convforge.data.resize``), and PSNR/SSIM are taken on
uint8 images with ``scale`` pixels shaved from each border.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convforge.data.dataset import Split
from convforge.data.imagefolder import IMAGE_EXTENSIONS, decode_image
from convforge.data.loader import ShardedLoader
from convforge.data.paths import printable
from convforge.data.resize import imresize
from convforge.errors import ConfigError, DataError

DEFAULT_PATCH_SIZE = 48
DEFAULT_STRIDE = 14
# ITU-R BT.601 on the [0, 255] scale, as MATLAB's rgb2ycbcr/ycbcr2rgb: ycbcr = OFFSET + RGB_TO_YCBCR @ rgb / 255.
RGB_TO_YCBCR = torch.tensor([[65.481, 128.553, 24.966],
                             [-37.797, -74.203, 112.0],
                             [112.0, -93.786, -18.214]], dtype=torch.float64)
YCBCR_OFFSET = torch.tensor([16.0, 128.0, 128.0], dtype=torch.float64)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images on [0, 1] to uint8 as MATLAB's ``uint8(x * 255)``: round half away from zero, saturate."""
    return (x.double() * 255.0).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def load_sr_image_y(path: str | os.PathLike) -> torch.Tensor:
    """The luma of an image file as uint8 (1, H, W): MATLAB's ``rgb2ycbcr`` Y, rounded; grayscale files as they are.

    An unreadable file raises a DataError naming it.
    """
    array = decode_image(os.fspath(path), None)
    image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if image.shape[0] == 1:
        return image
    return torch.floor(rgb_to_ycbcr_y(image) + 0.5).clamp_(0, 255).to(torch.uint8)


def modcrop(img: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop the last two dimensions (H, W) to multiples of ``scale``, keeping the top-left corner."""
    h, w = img.shape[-2:]
    if h < scale or w < scale:
        raise ValueError(f"a {h}x{w} image is smaller than the scale {scale}")
    return img[..., : h - h % scale, : w - w % scale]


def extract_patches(img: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """All (C, P, P) windows of a (C, H, W) image at ``stride``, from the top-left, as (N, C, P, P)."""
    c = img.shape[0]
    windows = img.unfold(1, patch_size, stride).unfold(2, patch_size, stride)
    return windows.permute(1, 2, 0, 3, 4).reshape(-1, c, patch_size, patch_size)


@dataclass
class SuperResData:
    """A super-resolution dataset: ``train`` holds uint8 HR luma patches (N, 1, P, P) with zero labels,
    ``test_sets`` maps a set name to its uint8 (1, H, W) HR images, cropped to a multiple of ``scale``."""

    train: Split
    test_sets: dict[str, list[torch.Tensor]]
    scale: int
    spec: str
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    notes: list[str] = field(default_factory=list)

    default_augment: str = "flip"  # random flips and 90-degree rotations of the patches; "none" turns them off
    val: None = None
    classes: tuple[str, ...] = ()

    @property
    def patch_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        """The size of the HR training patches."""
        return (self.patch_size, self.patch_size)

    @property
    def num_classes(self) -> int:
        """Output channels of a model for this data (the registry's ``num_classes``)."""
        return self.channels

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "task": "super-resolve",
            "scale": self.scale,
            "channels": self.channels,
            "patch_size": self.patch_size,
            "train": len(self.train),
            "test_sets": {name: len(images) for name, images in self.test_sets.items()},
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _image_files(folder: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise DataError(f"cannot list {printable(folder)}: {exc.strerror or exc}") from None
    return [folder / n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]


def load_sr_folder(folder: str | os.PathLike, scale: int) -> list[torch.Tensor]:
    """The images of one test folder (sorted by name) as uint8 (1, H, W) luma, cropped to a multiple of ``scale``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"test folder not found: {printable(folder)}")
    files = _image_files(folder)
    if not files:
        raise DataError(f"{printable(folder)} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    images = []
    for path in files:
        image = load_sr_image_y(path)
        if min(image.shape[1:]) < scale:
            raise DataError(f"image {printable(path)} ({image.shape[1]}x{image.shape[2]}) is smaller than the scale {scale}")
        images.append(modcrop(image, scale))
    return images


def load_superres(
    root: str | os.PathLike,
    scale: int,
    patch_size: int = DEFAULT_PATCH_SIZE,
    stride: int = DEFAULT_STRIDE,
    train_dir: str = "train-T91",
    test_dirs: tuple[str, ...] = ("Set5", "Set14", "BSD100"),
) -> SuperResData:
    """HR luma patches of ``root/train_dir`` and the test sets among ``root/test_dirs`` that exist.

    Each training image is cropped to a multiple of ``scale`` and cut into every ``patch_size``
    square at ``stride`` from the top-left, as SRCNN's data preparation does (its 33x33 sub-images
    at stride 14 give 21,884 patches of T91 at x3). The default, 48x48 at stride 14 (19,118 patches
    of T91 at x3), divides by 2, 3 and 4: the low-resolution patches are 24, 16 and 12 pixels.
    Images smaller than ``patch_size`` give no patch (counted in ``notes``).
    """
    root = Path(root)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"scale must be an integer >= 1, got {scale!r}")
    if patch_size < scale or patch_size % scale:
        raise ConfigError(f"patch size {patch_size} is not a multiple of the scale {scale}: use e.g. 48 for x2, x3 and x4")
    if stride < 1:
        raise ConfigError(f"stride must be >= 1, got {stride}")
    if not root.is_dir():
        raise DataError(f"super-resolution data directory not found: {printable(root)}")
    train_folder = root / train_dir
    if not train_folder.is_dir():
        raise DataError(f"training folder not found: {printable(train_folder)} (expected {printable(root)}/{train_dir}/*.png)")
    present = [name for name in test_dirs if (root / name).is_dir()]
    if not present:
        raise DataError(f"none of the test folders {', '.join(test_dirs)} is in {printable(root)}: at least one is needed")
    notes: list[str] = []
    patches, too_small = [], 0
    for path in _image_files(train_folder):
        image = load_sr_image_y(path)
        h, w = image.shape[1:]
        if h - h % scale < patch_size or w - w % scale < patch_size:
            too_small += 1
            continue
        patches.append(extract_patches(modcrop(image, scale), patch_size, stride))
    if not patches:
        raise DataError(
            f"no {patch_size}x{patch_size} training patch in {printable(train_folder)}: "
            f"{'it holds no images' if not too_small else f'all {too_small} images are smaller'}"
        )
    if too_small:
        notes.append(f"{too_small} training image(s) smaller than {patch_size}x{patch_size} gave no patch")
    images = torch.cat(patches)
    train = Split(images, torch.zeros(images.shape[0], dtype=torch.long))
    test_sets = {name: load_sr_folder(root / name, scale) for name in present}
    missing = [name for name in test_dirs if name not in present]
    if missing:
        notes.append(f"test folder(s) not found, skipped: {', '.join(missing)}")
    return SuperResData(train=train, test_sets=test_sets, scale=scale, spec=f"superres:{printable(root)}", notes=notes)


def dihedral(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Apply to each square image of (N, C, P, P) one of the 8 flips/rotations: ``codes`` (N,) in 0..7,
    bit 0 a left-right flip, bits 1-2 the number of quarter turns after it."""
    out = torch.empty_like(x)
    for code in range(8):
        chosen = (codes == code).nonzero().flatten()
        if len(chosen):
            part = x[chosen]
            if code & 1:
                part = part.flip(-1)
            out[chosen] = torch.rot90(part, code >> 1, dims=(-2, -1))
    return out


class SuperResLoader(ShardedLoader):
    """Batches ``(inputs, targets)`` of HR patches, float32 on [0, 1], with the interface of ``BatchLoader``.

    Targets are the uint8 patches / 255 after a random flip/rotation (``augment``) drawn per sample
    index from (seed, epoch), so a resumed run repeats its batches and sharding does not change them.
    Inputs are the targets downscaled by ``scale`` with MATLAB's bicubic, upscaled back to the target
    size when ``upsampled_input`` (SRCNN). Unlike SRCNN's code, which downscales whole images and then
    crops, each patch is downscaled on its own (MATLAB's mirrored borders at the patch edges).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        scale: int,
        upsampled_input: bool = False,
        augment: bool = True,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        h, w = split.images.shape[2:]
        if h != w or h % scale:
            raise ConfigError(f"super-resolution patches must be square with a side divisible by the scale {scale}, got {h}x{w}")
        self.device = torch.device(device)
        images = split.images
        if self.device.type != "cpu":
            images = images.to(self.device, non_blocking=True)
        self.images = images
        self.batch_size, self.scale, self.upsampled_input, self.augment = batch_size, scale, upsampled_input, augment
        self.shuffle, self.drop_last, self.seed, self.channels_last = shuffle, drop_last, seed, channels_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.last_indices = torch.empty(0, dtype=torch.long)

    def make_inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """The model inputs for HR ``targets`` (N, C, P, P) on [0, 1]: bicubic LR, or LR upscaled back."""
        inputs = imresize(targets, 1 / self.scale)
        return imresize(inputs, size=tuple(targets.shape[-2:])) if self.upsampled_input else inputs

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from ``start_batch`` on; ``last_indices`` holds those of the batch last yielded."""
        n = self.images.shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 5_555_555)
        codes = torch.randint(0, 8, (n,), generator=gen)
        for idx in self._batches()[start_batch:]:
            self.last_indices = idx
            x = self.images[idx.to(self.images.device)]
            if self.augment:
                x = dihedral(x, codes[idx].to(x.device))
            targets = x.float().div_(255.0)
            inputs = self.make_inputs(targets)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            yield inputs, targets


def bicubic_pair(image: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HR uint8 (1, H, W) -> (HR float64 (1, 1, H, W) on [0, 1], its bicubic LR, that LR upscaled back)."""
    hr = image.double().div(255.0).unsqueeze(0)
    lr = imresize(hr, 1 / scale)
    return hr, lr, imresize(lr, scale)


def run_model(model: nn.Module, x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``model(x)`` on ``device`` in the model's dtype, returned as float64 on the CPU."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    return model(x.to(device=device, dtype=dtype)).double().cpu()


Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_ycbcr_y(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images (N, 3, H, W) or (3, H, W), uint8 or float on [0, 255], as float64 on [16, 235].

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` (unrounded; MATLAB rounds for uint8 input).
    """
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"rgb_to_ycbcr_y needs RGB images (N, 3, H, W) or (3, H, W), got shape {tuple(x.shape)}")
    x = x.double()
    r, g, b = x.unbind(-3)
    y = 16.0 + (Y_WEIGHTS[0] * r + Y_WEIGHTS[1] * g + Y_WEIGHTS[2] * b) / 255.0
    return y.unsqueeze(-3)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """RGB (..., 3, H, W) on [0, 255] to YCbCr on [0, 255] (MATLAB's ``rgb2ycbcr``, unrounded), float64."""
    return _mix_channels(RGB_TO_YCBCR / 255.0, x.double()).add_(YCBCR_OFFSET.view(3, 1, 1))


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rgb_to_ycbcr`` (MATLAB's ``ycbcr2rgb``), float64 on [0, 255], unclamped."""
    return _mix_channels(torch.linalg.inv(RGB_TO_YCBCR / 255.0), x.double() - YCBCR_OFFSET.view(3, 1, 1))


def _mix_channels(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` over the channel axis of (..., 3, H, W), as one matrix product (einsum permutes)."""
    return torch.matmul(matrix, x.reshape(*x.shape[:-2], -1)).reshape(x.shape)


def upscale_rgb(
    model: nn.Module,
    image: torch.Tensor,
    scale: int,
    upsampled_input: bool,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Upscale a uint8 (3, H, W) RGB or (1, H, W) gray image by ``scale`` with a one-channel (luma) model.

    The model super-resolves Y (or the gray channel); Cb and Cr are upscaled by bicubic; the result
    goes back to RGB (ITU-R BT.601 as MATLAB's ``ycbcr2rgb``) and is rounded to uint8 (C, sH, sW).
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"upscale_rgb needs a uint8 (3, H, W) or (1, H, W) image, got {image.dtype} {tuple(image.shape)}")
    planes = rgb_to_ycbcr(image) if image.shape[0] == 3 else image.double()
    planes = planes.div(255.0).unsqueeze(0)
    luma = planes[:, :1]
    out_size = (image.shape[1] * scale, image.shape[2] * scale)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = run_model(model, imresize(luma, scale) if upsampled_input else luma, device)
    finally:
        model.train(was_training)
    if y.shape[-2:] != out_size:
        raise ValueError(f"the model gave a {tuple(y.shape[-2:])} image, expected {tuple(out_size)} "
                         f"(is upsampled_input={upsampled_input} right for this model?)")
    y = y.clamp(0, 1)
    if image.shape[0] == 1:
        return to_uint8(y)[0]
    ycbcr = torch.cat([y, imresize(planes[:, 1:], scale)], dim=1)[0] * 255.0
    return to_uint8(ycbcr_to_rgb(ycbcr) / 255.0)
