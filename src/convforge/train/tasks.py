"""What the engine needs to know about a task: its data, model, batches, loss and evaluation.

One engine trains every task (``--task classify|segment|super-resolve``); a task only says what
differs. Classification keeps its own path in the engine for mixing and distillation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.config import TrainConfig
from convforge.errors import ConfigError, DataError
from convforge.models import create_model

TASKS = ("classify", "segment", "super-resolve")


@dataclass
class Task:
    """A task's name and the metric that selects the best checkpoint (higher is better)."""

    name: str
    primary: str

    def load_data(self, cfg: TrainConfig, log: Callable[[str], None]) -> Any:
        from convforge.data import load

        return load(cfg.data, image_size=cfg.image_size, skip_bad_images=cfg.skip_bad_images,
                    cache_dir=cfg.cache_dir, log=log)

    def model_args(self, cfg: TrainConfig, data: Any) -> dict[str, Any]:
        args = dict(cfg.model_args)
        if cfg.drop_path is not None:
            args["drop_path_rate"] = cfg.drop_path
        return args

    def build_model(self, cfg: TrainConfig, data: Any, model_args: dict[str, Any]) -> nn.Module:
        model = create_model(cfg.model, num_classes=data.num_classes, in_chans=data.channels, **model_args)
        model_task = getattr(model, "task", "classify")
        if model_task != self.name:
            raise ConfigError(f"model {cfg.model!r} is a {model_task} model; use --task {model_task} "
                              f"or a {self.name} model (convforge models lists them)")
        return model

    def input_size(self, data: Any, model: nn.Module) -> tuple[int, int, int]:
        """The (C, H, W) of one model input during training (for MACs)."""
        return (data.channels, *data.image_size)

    def train_loader(self, data: Any, cfg: TrainConfig, model: nn.Module, device: torch.device, rank: int,
                     world_size: int):
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor, cfg: TrainConfig, data: Any) -> torch.Tensor:
        raise NotImplementedError

    def eval_splits(self, data: Any) -> list[str]:
        return ["val", "test"] if data.val is not None else ["test"]

    def evaluate(self, model: nn.Module, data: Any, split: str, cfg: TrainConfig, device: torch.device,
                 rank: int, world_size: int) -> dict[str, float]:
        raise NotImplementedError

    def meta(self, data: Any) -> dict[str, Any]:
        """Task facts a checkpoint needs to be used without restating them."""
        return {}


class ClassifyTask(Task):
    def train_loader(self, data, cfg, model, device, rank, world_size):
        from convforge.data import BatchLoader

        return BatchLoader(data.train, cfg.batch_size, data.mean, data.std, shuffle=True, augment=cfg.augment,
                           crop_padding=cfg.crop_padding, drop_last=True, seed=cfg.seed, device=device,
                           channels_last=cfg.channels_last, rank=rank, world_size=world_size)

    def evaluate(self, model, data, split, cfg, device, rank, world_size):
        from convforge.train.evaluate import evaluate

        result = evaluate(model, data.split(split), data.mean, data.std, batch_size=max(256, cfg.batch_size),
                          device=device, amp=cfg.amp, tta=cfg.eval_tta, channels_last=cfg.channels_last,
                          num_classes=data.num_classes, details=False, rank=rank, world_size=world_size)
        return {"loss": result["loss"], "top1": result["top1"], "top5": result["top5"]}


class SegmentTask(Task):
    def load_data(self, cfg, log):
        data = super().load_data(cfg, log)
        if getattr(data, "task", None) != "segment":
            raise DataError(f"--task segment needs segmentation data (segfolder:DIR), got {cfg.data!r}")
        return data

    def train_loader(self, data, cfg, model, device, rank, world_size):
        from convforge.data.joint_augment import SegmentationLoader

        return SegmentationLoader(data.train, cfg.batch_size, data.mean, data.std, shuffle=True,
                                  augment=cfg.augment, scales=tuple(cfg.seg_scales),
                                  crop=tuple(int(v) for v in cfg.seg_crop) if cfg.seg_crop else None,
                                  ignore_index=data.ignore_index, drop_last=True, seed=cfg.seed, device=device,
                                  channels_last=cfg.channels_last, rank=rank, world_size=world_size)

    def loss(self, output, target, cfg, data):
        from convforge.train.losses import segmentation_loss

        return segmentation_loss(output, target, data.ignore_index, cfg.dice_weight)

    def evaluate(self, model, data, split, cfg, device, rank, world_size):
        from convforge.measure.segmentation import evaluate_segmentation

        result = evaluate_segmentation(model, data.split(split), data.mean, data.std, num_classes=data.num_classes,
                                       ignore_index=data.ignore_index, batch_size=max(8, cfg.batch_size),
                                       device=device, amp=cfg.amp, channels_last=cfg.channels_last,
                                       rank=rank, world_size=world_size)
        return {k: result[k] for k in ("loss", "miou", "pixel_acc", "mean_acc", "per_class_iou")}

    def meta(self, data):
        return {"ignore_index": data.ignore_index}


SUPERRES_KINDS = ("superres", "sr")


class SuperResolveTask(Task):
    def load_data(self, cfg, log):
        from convforge.data.superres import load_superres

        kind, _, root = cfg.data.partition(":")
        if kind not in SUPERRES_KINDS or not root:
            raise DataError(f"--task super-resolve needs --data superres:DIR (DIR with train-T91/ and test sets "
                            f"such as Set5/, Set14/, BSD100/), got {cfg.data!r}")
        data = load_superres(root, cfg.scale)
        data.spec = cfg.data
        return data

    def model_args(self, cfg, data):
        return {**super().model_args(cfg, data), "scale": cfg.scale}

    def train_loader(self, data, cfg, model, device, rank, world_size):
        from convforge.data.superres import SuperResLoader

        return SuperResLoader(data.train, cfg.batch_size, scale=data.scale,
                              upsampled_input=bool(getattr(model, "upsampled_input", False)),
                              augment=cfg.augment != "none", shuffle=True, drop_last=True, seed=cfg.seed,
                              device=device, channels_last=cfg.channels_last, rank=rank, world_size=world_size)

    def input_size(self, data, model):
        side = data.patch_size if getattr(model, "upsampled_input", False) else data.patch_size // data.scale
        return (data.channels, side, side)

    def loss(self, output, target, cfg, data):
        return F.mse_loss(output.float(), target)

    def eval_splits(self, data):
        return list(data.test_sets)

    def evaluate(self, model, data, split, cfg, device, rank, world_size):
        from convforge.data.superres import evaluate_superres

        result = evaluate_superres(model, data.test_sets[split], data.scale,
                                   upsampled_input=bool(getattr(model, "upsampled_input", False)), device=device)
        return {k: result[k] for k in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")}

    def meta(self, data):
        return {"scale": data.scale}


def get_task(name: str) -> Task:
    """The task called ``name`` (one of :data:`TASKS`)."""
    if name == "classify":
        return ClassifyTask("classify", "top1")
    if name == "segment":
        return SegmentTask("segment", "miou")
    if name == "super-resolve":
        return SuperResolveTask("super-resolve", "psnr")
    raise ConfigError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
