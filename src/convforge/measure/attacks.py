"""White-box attacks on classifiers whose inputs are images on [0, 1]: FGSM and PGD (Linf and L2).

Every attack takes ``model``, a function of images on [0, 1] (normalisation inside it: wrap a
convforge model with :class:`NormalizedClassifier`), and returns adversarial images on [0, 1]
within ``eps`` of the clean ones. Written here rather than taken from torchattacks because the
same PGD serves adversarial training, where it must run under the engine's autocast, keep the
model's train/eval mode as the recipe says and draw its random starts from the run's seeded
generator (exact resume); torchattacks' PGD also has no restarts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> per-example losses
NORMS = ("linf", "l2")


class NormalizedClassifier(nn.Module):
    """``model((x - mean) / std)``: a classifier of images on [0, 1], as attacks and RobustBench expect."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def cross_entropy_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def fgsm(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
         *, loss_fn: LossFn = cross_entropy_per_example) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size ``eps`` along the gradient's sign."""
    return pgd(model, x, y, eps, steps=1, step_size=eps, random_start=False, loss_fn=loss_fn)


def pgd(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    loss_fn: LossFn = cross_entropy_per_example,
) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn`` (Madry et al. 2018) within the ``norm`` ball of radius ``eps``.

    ``step_size`` defaults to 2.5 * eps / steps (Madry et al.'s choice); ``random_start`` draws the start
    uniformly from the ball (Linf) or on a random direction within it (L2). With ``restarts`` > 1 each point
    keeps the first restart that fools the model, else the one with the highest loss (the worst case).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if eps < 0 or steps < 1 or restarts < 1:
        raise ValueError(f"need eps >= 0, steps >= 1 and restarts >= 1 (got {eps}, {steps}, {restarts})")
    x = x.detach()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        candidate = _pgd_once(model, x, y, eps, norm, steps, step_size, random_start, generator, loss_fn)
        with torch.no_grad():
            logits = model(candidate)
            loss = loss_fn(logits, y).float()
            wrong = logits.argmax(1) != y
        better = ~fooled & (wrong | (loss > best_loss))
        best[better] = candidate[better]
        best_loss = torch.where(better, loss, best_loss)
        fooled |= wrong
        if bool(fooled.all()):
            break
    return best


def _pgd_once(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
              norm: str, steps: int, step_size: float, random_start: bool, generator: torch.Generator | None,
              loss_fn: LossFn) -> torch.Tensor:
    start = random_delta(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    return ascend(lambda images: loss_fn(model(images), y).sum(), x, start, eps, norm, steps, step_size)


def ascend(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: torch.Tensor, eps: float,
           norm: str, steps: int, step_size: float) -> torch.Tensor:
    """Projected steepest ascent of the scalar ``loss_of(images)`` from ``x + start`` within the ``norm`` ball of
    radius ``eps`` and [0, 1] (the loop of PGD and of adversarial training's attacks); ``start`` is taken in
    x's memory layout (a mixed layout would run the slow convolution path)."""
    delta = (x + project(start.contiguous(memory_format=memory_layout(x)), eps, norm)).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(x + delta), delta)
        with torch.no_grad():
            delta = project(delta + step_size * ascent_direction(grad, norm), eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def memory_layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored so, else the default layout."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def random_delta(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random perturbation in the ball: uniform per pixel (Linf), or uniform radius along a random direction (L2)."""
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype) * eps
    return direction / _l2(direction).clamp_min(1e-12) * radius


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent step of unit size for ``norm``: the gradient's sign (Linf) or its unit vector (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / _l2(grad).clamp_min(1e-12)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``delta`` projected onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def parse_eps(text: str | float) -> float:
    """``"8/255"``, ``"0.5"`` or a number as a float on the [0, 1] pixel scale."""
    if isinstance(text, (int, float)):
        return float(text)
    value = text.strip()
    try:
        if "/" in value:
            num, den = value.split("/", 1)
            return float(num) / float(den)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a perturbation size: {text!r} (write e.g. 8/255 or 0.5)") from None
