"""Image classification: mixup/CutMix/random erasing, label smoothing and distillation live in its loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from convforge.errors import ConfigError
from convforge.train.adversarial import (ADV_EVAL_STEPS, Adversary, TradesTargets, attack_generator, check_adversarial,
                                         robust_top1)
from convforge.train.distill import distillation_loss, load_teachers
from convforge.train.mixing import MixedTargets, batch_rng, mix_batch, random_erase
from convforge.train.tasks.base import Step, Task, short_repr

DATA_INIT_IMAGES = 5000  # images that data-dependent initialisation (init_from_data) sees


class ClassifyTask(Task):
    """One class per image; top-1 accuracy selects the best checkpoint."""

    name = "classify"
    primary = "top1"
    unit = "%"
    stat_keys = ("correct",)

    def augments(self) -> tuple[str, ...]:
        from convforge.data.loader import AUGMENTS
        from convforge.data.photos import PHOTO_AUGMENTS

        return (*AUGMENTS, *PHOTO_AUGMENTS)

    def check_config(self, cfg: Any) -> None:
        from convforge.data.loader import AUGMENTS
        from convforge.data.photos import PHOTO_AUGMENTS

        check_adversarial(cfg)
        store = getattr(cfg, "store_size", None) is not None
        if cfg.augment is None or cfg.augment in (PHOTO_AUGMENTS if store else AUGMENTS):
            return
        if cfg.augment in PHOTO_AUGMENTS:
            raise ConfigError(f"--augment {cfg.augment} is for image-store data: add --store-size N "
                              f"(with --data imagefolder:DIR or wds:DIR), or use one of {', '.join(AUGMENTS)}")
        if store and cfg.augment in AUGMENTS:
            raise ConfigError(f"--augment {cfg.augment} is for fixed-size data; with --store-size use one of "
                              f"{', '.join(PHOTO_AUGMENTS)}")
        raise ConfigError(f"unknown augment {short_repr(cfg.augment)} for --task {cfg.task}: "
                          f"use one of {', '.join(PHOTO_AUGMENTS if store else AUGMENTS)}")

    def prepare_model(self, model: nn.Module, data: Any, cfg: Any, from_init: bool) -> None:
        """Data-dependent initialisation (e.g. SpeedNet's whitening stem) from a seeded sample of train images
        (for store data, their evaluation views; for shard data, a seeded sample's evaluation views).

        Every rank draws the same sample, so all processes start from the same weights; a resumed run
        overwrites them with the saved ones.
        """
        if from_init or not hasattr(model, "init_from_data"):
            return
        from convforge.data import normalize
        from convforge.data.loader import epoch_permutation
        from convforge.data.views import resize_center_crop_batch

        if getattr(data, "is_shards", False):
            model.init_from_data(normalize(data.sample_views(DATA_INIT_IMAGES, cfg.seed), data.mean, data.std))
            return
        indices = epoch_permutation(len(data.train), cfg.seed, -1)[:DATA_INIT_IMAGES]
        if getattr(data, "is_store", False):
            images = resize_center_crop_batch([data.train.image(int(i)) for i in indices], data.image_size,
                                              data.crop_pct)
        else:
            images = data.train.images[indices]
        model.init_from_data(normalize(images, data.mean, data.std))

    def train_loader(self, data, cfg, model, device, rank, world_size):
        if getattr(data, "has_crop_views", False):
            return store_train_loader(data, cfg, device, rank, world_size)
        from convforge.data import BatchLoader

        return BatchLoader(data.train, cfg.batch_size, data.mean, data.std, shuffle=True, augment=cfg.augment,
                           crop_padding=cfg.crop_padding, pad_mode=cfg.pad_mode, drop_last=True, seed=cfg.seed, device=device,
                           channels_last=cfg.channels_last, rank=rank, world_size=world_size)

    def start_training(self, cfg: Any, data: Any, device: torch.device) -> dict[str, Any]:
        teachers = load_teachers(cfg, data.num_classes, data.channels, data.mean, data.std, device)
        mean = torch.tensor(list(data.mean), device=device).view(1, -1, 1, 1)
        std = torch.tensor(list(data.std), device=device).view(1, -1, 1, 1)
        return {"teachers": teachers, "mean": mean, "std": std, "adversary": Adversary.from_config(cfg, mean, std)}

    def prepare_batch(self, x: torch.Tensor, y: Any, step: Step) -> tuple[torch.Tensor, Any]:
        cfg = step.cfg
        adversary = step.extras.get("adversary")
        if adversary is not None:
            generator = attack_generator(cfg.seed, step.epoch, step.batch, step.rank, x.device)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                adv = adversary.perturb(step.model, x, y, generator)
            if adversary.method == "trades":
                return adv, TradesTargets(y, x, adversary.beta, step.forward)
            return adv, MixedTargets(y, y, 1.0)
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.random_erasing > 0:
            rng = batch_rng(cfg.seed, step.epoch, step.batch, step.rank)
            x, targets = mix_batch(x, y, cfg.mixup_alpha, cfg.cutmix_alpha, rng)
            return random_erase(x, cfg.random_erasing, rng), targets
        return x, MixedTargets(y, y, 1.0)

    def training_loss(self, output: torch.Tensor, target: Any, x: torch.Tensor, step: Step) -> torch.Tensor:
        cfg = step.cfg
        loss = target.loss(output.float(), cfg.label_smoothing)
        teachers = step.extras.get("teachers")
        if not teachers:
            return loss
        if cfg.kd_consistent:
            view = x
        else:
            view = step.loader.clean_batch(step.loader.last_indices) if cfg.augment != "none" else step.clean
        mean, std = step.extras["mean"], step.extras["std"]
        soft = sum(t.probabilities(view, mean, std, cfg.kd_temperature) for t in teachers) / len(teachers)
        return (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * distillation_loss(output, soft, cfg.kd_temperature)

    def loss(self, output, target, cfg, data):
        return MixedTargets(target, target, 1.0).loss(output.float(), cfg.label_smoothing)

    def step_stats(self, output: torch.Tensor, y: Any) -> dict[str, float]:
        return {"correct": float((output.detach().argmax(1) == y).sum())}

    def epoch_stats(self, sums: dict[str, float]) -> dict[str, float]:
        return {"train_top1": 100 * sums["correct"] / sums["seen"]}

    def progress_value(self, sums: dict[str, float]) -> float:
        return 100 * sums["correct"] / sums["seen"]

    def evaluate(self, model, data, split, cfg, device, rank, world_size):
        from convforge.train.evaluate import evaluate

        view = data.eval_view if getattr(data, "has_crop_views", False) else None
        result = evaluate(model, data.split(split), data.mean, data.std, view=view,
                          batch_size=max(256, cfg.batch_size), device=device, amp=cfg.amp, tta=cfg.eval_tta,
                          tta_shift=cfg.eval_tta_shift,
                          channels_last=cfg.channels_last, num_classes=data.num_classes, details=False, rank=rank,
                          world_size=world_size)
        metrics = {"loss": result["loss"], "top1": result["top1"], "top5": result["top5"]}
        if cfg.adv_eval_samples and split == self.eval_splits(data)[0]:  # the split that selects the best epoch
            robust = robust_top1(model, data, split, cfg, device)
            if robust is not None:
                metrics[f"pgd{ADV_EVAL_STEPS}_top1"] = robust
        return metrics

    def select_metric(self, cfg: Any) -> str:
        """Adversarial training with a per-epoch PGD evaluation keeps the epoch of best PGD accuracy (early
        stopping against robust overfitting, Rice et al. 2020, and FGSM's catastrophic overfitting, Wong et al.)."""
        return f"pgd{ADV_EVAL_STEPS}_top1" if cfg.adv_train and cfg.adv_eval_samples else self.primary

    def meta(self, data: Any) -> dict[str, Any]:
        """Store and shard data: the evaluation transform, and its crop as the model's input size (FixRes: the
        evaluation crop may differ from the training crop; eval, predict, export and quantize use it)."""
        if not getattr(data, "has_crop_views", False):
            return {}
        return {"preprocess": data.preprocess(), "input_size": [data.channels, *data.eval_view.size]}

    def epoch_text(self, record: dict[str, Any], eval_splits: list[str]) -> list[str]:
        train = [f"train {record['train_top1']:.2f}%"] if "train_top1" in record else []
        robust = [f"{split} PGD-{ADV_EVAL_STEPS} {record[key]:.2f}%" for split in eval_splits
                  if (key := f"{split}_pgd{ADV_EVAL_STEPS}_top1") in record]
        return train + super().epoch_text(record, eval_splits) + robust

    def summary_fields(self, final: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
        return {"test_top1": final.get("test_top1"), "test_top5": final.get("test_top5"),
                "test_loss": final.get("test_loss"), "val_top1": final.get("val_top1"),
                **({f"{split}_pgd_top1": final[key] for split in ("val", "test")
                    if (key := f"{split}_pgd{ADV_EVAL_STEPS}_top1") in final}),
                "best_top1": best["score"]}

    def done_text(self, final: dict[str, Any], select_key: str, wall_time_s: float) -> str:
        return f"done: test top-1 {final['test_top1']:.2f}% in {wall_time_s:.1f} s"


def store_train_loader(data: Any, cfg: Any, device: torch.device, rank: int, world_size: int) -> Any:
    """The StoreLoader of image-store training (a ShardLoader of shard data's train shards):
    RandomResizedCrop (``rrc_scale``, ``rrc_ratio``) + flip (+ TrivialAugment or RandAugment), or centre
    views; crop size per epoch by ``progressive_resize``."""
    from functools import partial

    from convforge.data.photos import STORE_AUGMENT_OF
    from convforge.data.store_loader import StoreLoader, progressive_size

    schedule = None
    if cfg.progressive_resize:
        start, first, last = (int(v) for v in cfg.progressive_resize)
        schedule = partial(progressive_size, image_size=data.image_size, start=start, first=first, last=last)
    options = dict(scale=tuple(cfg.rrc_scale), ratio=tuple(cfg.rrc_ratio), center=cfg.augment == "center",
                   augment=STORE_AUGMENT_OF.get(cfg.augment), randaugment=tuple(int(v) for v in cfg.randaugment),
                   size_schedule=schedule, seed=cfg.seed, device=device, channels_last=cfg.channels_last, rank=rank,
                   world_size=world_size)
    if getattr(data, "is_shards", False):
        return data.train.loader(cfg.batch_size, data.mean, data.std, train=True, image_size=data.image_size,
                                 crop_pct=data.crop_pct, interpolation=data.interpolation, **options)
    return StoreLoader(data.train, cfg.batch_size, data.mean, data.std, train=True, image_size=data.image_size,
                       crop_pct=data.crop_pct, interpolation=data.interpolation, **options)
