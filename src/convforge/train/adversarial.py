"""Adversarial training (``--adv-train pgd|fgsm-rs|trades``): each training batch is replaced by adversarial
examples made against the model being trained, within an Linf ball of ``--adv-eps`` on the [0, 1] pixel scale.

- pgd: Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks" (CIFAR-10:
  eps 8/255, 7 steps of 2/255, random start; examples made in training mode, as their code does).
- fgsm-rs: Wong et al. 2020, "Fast is better than free": one FGSM step of 1.25 eps (10/255 at 8/255) from a
  uniform random start in the ball, in training mode.
- trades: Zhang et al. 2019: loss = CE(f(x), y) + beta * KL(f(x) || f(x')), x' found by 10 steps of 0.007
  (about 2/255) maximising the KL from a start 0.001 * N(0, 1) away, in eval mode as their code does;
  eps 0.031 (8/255), beta 6.

Random starts come from a generator seeded by (seed, epoch, batch, rank): a resumed run repeats them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.errors import ConfigError
from convforge.measure.attacks import NormalizedClassifier, ascend, memory_layout, pgd, random_delta

ADV_METHODS = ("pgd", "fgsm-rs", "trades")
# method -> (eps, steps, step size, beta) of its paper's CIFAR-10 setting
ADV_DEFAULTS: dict[str, tuple[float, int, float, float]] = {
    "pgd": (8 / 255, 7, 2 / 255, 0.0),
    "fgsm-rs": (8 / 255, 1, 10 / 255, 0.0),
    "trades": (8 / 255, 10, 2 / 255, 6.0),
}
ADV_SOURCES = {"pgd": "Madry et al. 2018", "fgsm-rs": "Wong et al. 2020", "trades": "Zhang et al. 2019"}
ADV_EVAL_STEPS = 10  # PGD steps of the per-epoch robust evaluation (--adv-eval-samples)
INCOMPATIBLE = ("mixup_alpha", "cutmix_alpha", "random_erasing", "teachers", "teacher_model")


def check_adversarial(cfg: Any) -> None:
    """ConfigError for a bad --adv-train setting or options adversarial training cannot be combined with."""
    if cfg.adv_train in (None, "none"):
        given = [name for name in ("adv_eps", "adv_steps", "adv_step_size", "adv_beta") if getattr(cfg, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: settings of adversarial training: add --adv-train "
                              f"{'|'.join(ADV_METHODS)}")
        return
    if cfg.adv_train not in ADV_METHODS:
        raise ConfigError(f"adv_train must be one of {', '.join(ADV_METHODS)}, got {cfg.adv_train!r}")
    if cfg.adv_eps is not None and not 0 < cfg.adv_eps <= 1:
        raise ConfigError(f"adv_eps must be in (0, 1] (the [0, 1] pixel scale: write 8/255), got {cfg.adv_eps}")
    if cfg.adv_steps is not None and not 1 <= cfg.adv_steps <= 1000:
        raise ConfigError(f"adv_steps must be in 1..1000, got {cfg.adv_steps}")
    if cfg.adv_step_size is not None and not 0 < cfg.adv_step_size <= 1:
        raise ConfigError(f"adv_step_size must be in (0, 1], got {cfg.adv_step_size}")
    if cfg.adv_beta is not None and (cfg.adv_beta < 0 or cfg.adv_train != "trades" and cfg.adv_beta != 0):
        raise ConfigError(f"adv_beta is TRADES's weight of the robustness term (>= 0, with --adv-train trades), "
                          f"got {cfg.adv_beta} with --adv-train {cfg.adv_train}")
    if cfg.adv_train == "fgsm-rs" and cfg.adv_steps not in (None, 1):
        raise ConfigError(f"fgsm-rs takes one step; got adv_steps {cfg.adv_steps} (use --adv-train pgd for more)")
    mixed = [name for name in INCOMPATIBLE if getattr(cfg, name)]
    if mixed:
        raise ConfigError(f"--adv-train cannot be combined with {', '.join(mixed)}: the attack is made against "
                          "the labels of unmixed images")


def resolve_adversarial(cfg: Any) -> Any:
    """A copy of ``cfg`` with the adversarial settings left unset filled from the method's paper."""
    if cfg.adv_train in (None, "none"):  # "none": off, also over a recipe that turns it on
        return dataclasses.replace(cfg, adv_train=None, adv_eval_samples=0)
    eps, steps, step_size, beta = ADV_DEFAULTS[cfg.adv_train]
    eps_given = cfg.adv_eps is not None
    cfg = dataclasses.replace(
        cfg, adv_eps=cfg.adv_eps if eps_given else eps,
        adv_steps=cfg.adv_steps if cfg.adv_steps is not None else steps,
        adv_beta=cfg.adv_beta if cfg.adv_beta is not None else beta,
        adv_eval_samples=1000 if cfg.adv_eval_samples is None else cfg.adv_eval_samples)
    if cfg.adv_step_size is None:  # the paper's step, scaled with a changed eps
        cfg.adv_step_size = step_size * (cfg.adv_eps / eps)
    return cfg


def describe(cfg: Any) -> str:
    """One line naming the method, its settings in 1/255 units and its source."""
    if cfg.adv_train is None:
        return ""
    extra = f" beta {cfg.adv_beta:g}" if cfg.adv_train == "trades" else ""
    return (f"adversarial training: {cfg.adv_train} ({ADV_SOURCES[cfg.adv_train]}), Linf eps {cfg.adv_eps * 255:.3g}/255, "
            f"{cfg.adv_steps} step(s) of {cfg.adv_step_size * 255:.3g}/255{extra}; train top-1 is measured on the "
            "adversarial examples")


@dataclass
class Adversary:
    """Makes a batch's adversarial examples; works on normalised batches (``mean``/``std`` as (1, C, 1, 1))."""

    method: str
    eps: float
    steps: int
    step_size: float
    beta: float
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_config(cls, cfg: Any, mean: torch.Tensor, std: torch.Tensor) -> Adversary | None:
        if cfg.adv_train is None:
            return None
        return cls(cfg.adv_train, cfg.adv_eps, cfg.adv_steps, cfg.adv_step_size, cfg.adv_beta, mean, std)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The adversarial version of the normalised batch ``x`` (normalised, detached, in x's memory format)."""
        fmt = memory_layout(x)  # every tensor of the attack in x's layout (a mixed layout runs the slow path)
        pixels = (x.detach().float() * self.std + self.mean).clamp(0, 1).contiguous(memory_format=fmt)
        was_training = model.training
        if self.method == "trades":
            model.eval()
        try:
            adv = self._attack(model, pixels, y, generator)
        finally:
            model.train(was_training)
        return ((adv - self.mean) / self.std).to(dtype=x.dtype, memory_format=fmt)

    def _attack(self, model: nn.Module, pixels: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        def logits_of(images: torch.Tensor) -> torch.Tensor:
            return model((images - self.mean) / self.std).float()

        if self.method == "trades":
            with torch.no_grad():
                clean = F.softmax(logits_of(pixels), dim=1)
            start = 0.001 * torch.randn(pixels.shape, generator=generator, device=pixels.device)

            def loss_of(images: torch.Tensor) -> torch.Tensor:
                return F.kl_div(F.log_softmax(logits_of(images), dim=1), clean, reduction="sum")
        else:
            start = random_delta(pixels, self.eps, "linf", generator)

            def loss_of(images: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(logits_of(images), y, reduction="sum")
        return ascend(loss_of, pixels, start, self.eps, "linf", self.steps, self.step_size)


def attack_generator(seed: int, epoch: int, batch: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one batch's random starts, seeded by (seed, epoch, batch, rank)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, epoch, batch, rank, 0xAD5]).generate_state(1, np.uint64)[0]
                              & 0x7FFF_FFFF_FFFF_FFFF))
    return generator


@dataclass
class TradesTargets:
    """Labels and the clean batch of a TRADES step: loss = CE(f(clean), y) + beta * KL(f(clean) || f(adv))."""

    y: torch.Tensor
    clean: torch.Tensor
    beta: float
    forward: Callable[[torch.Tensor], torch.Tensor]

    def loss(self, adv_logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        clean_logits = self.forward(self.clean).float()
        natural = F.cross_entropy(clean_logits, self.y, label_smoothing=label_smoothing)
        robust = F.kl_div(F.log_softmax(adv_logits.float(), dim=1), F.softmax(clean_logits, dim=1),
                          reduction="batchmean")
        return natural + self.beta * robust


def robust_top1(model: nn.Module, data: Any, split: str, cfg: Any, device: torch.device) -> float | None:
    """PGD-10 top-1 (%) at ``cfg.adv_eps`` of ``model`` on ``cfg.adv_eval_samples`` seeded images of ``split``
    (None for shard data, which has no random access). The model is evaluated in eval mode, float32."""
    if getattr(data, "is_shards", False):
        return None
    images, labels = _seeded_views(data, split, cfg.adv_eval_samples, cfg.seed)
    classifier = NormalizedClassifier(model, data.mean, data.std).to(device)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    correct = 0
    try:
        for start in range(0, len(labels), 256):
            x = images[start:start + 256].to(device).float() / 255
            y = labels[start:start + 256].to(device)
            adv = pgd(classifier, x, y, cfg.adv_eps, steps=ADV_EVAL_STEPS, generator=generator)
            with torch.no_grad():
                correct += int((classifier(adv).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / max(len(labels), 1)


def _seeded_views(data: Any, split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) evaluation views and labels of ``count`` seeded images of ``split`` (what
    train.inference.view_images does, which this module cannot import: inference reaches the tasks, which
    import this module)."""
    part = data.split(split)
    generator = np.random.default_rng([seed, 0xE7A1])
    indices = np.sort(generator.permutation(len(part.labels))[:count])
    labels = torch.as_tensor(part.labels)[torch.from_numpy(indices)]
    if not getattr(data, "is_store", False):
        return part.images[torch.from_numpy(indices)], labels
    from convforge.data.views import resize_center_crop_batch

    return resize_center_crop_batch([part.image(int(i)) for i in indices], *data.eval_view), labels
