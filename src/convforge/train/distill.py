"""Knowledge distillation: soft targets from one or several frozen teachers (Hinton et al. 2015;
several teachers averaged as in MEAL V2; "consistent" teaching as in Beyer et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convforge.errors import ConfigError


class Teacher:
    """A frozen model with its own input normalisation; gives temperature-softened class probabilities."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.mean = torch.tensor(list(mean)).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std)).view(1, -1, 1, 1)
        self.name = name

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, student_mean: torch.Tensor, student_std: torch.Tensor,
                      temperature: float) -> torch.Tensor:
        """Soft targets for ``x`` (normalised with the student's statistics)."""
        pixels = x.float() * student_std + student_mean
        logits = self.model((pixels - self.mean.to(x.device)) / self.std.to(x.device)).float()
        return F.softmax(logits / temperature, dim=1)


def load_teachers(cfg, num_classes: int, channels: int, data_mean: Sequence[float], data_std: Sequence[float],
                  device: torch.device) -> list[Teacher]:
    """The teachers of ``cfg``: convforge checkpoints (``teachers``) and/or a foreign weight file."""
    from convforge.models import create_model, load_foreign_weights
    from convforge.train.checkpoint import load_checkpoint

    teachers = []
    for path in cfg.teachers:
        checkpoint = load_checkpoint(path)
        if len(checkpoint.classes) != num_classes:
            raise ConfigError(f"teacher {path} predicts {len(checkpoint.classes)} classes, the data has {num_classes}")
        if checkpoint.input_size[0] != channels:
            raise ConfigError(f"teacher {path} takes {checkpoint.input_size[0]} channels, the data has {channels}")
        teachers.append(Teacher(checkpoint.model.to(device), checkpoint.mean, checkpoint.std, str(path)))
    if cfg.teacher_model:
        model = create_model(cfg.teacher_model, num_classes=num_classes, in_chans=channels)
        load_foreign_weights(model, cfg.teacher_weights)
        mean = cfg.teacher_mean or list(data_mean)
        std = cfg.teacher_std or list(data_std)
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"--teacher-mean/--teacher-std need {channels} values each, got {len(mean)} and {len(std)}")
        teachers.append(Teacher(model.to(device), mean, std, f"{cfg.teacher_model}:{cfg.teacher_weights}"))
    return teachers


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` on temperature-softened distributions (batch mean)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2
