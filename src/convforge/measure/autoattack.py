"""AutoAttack (Croce & Hein 2020) as RobustBench runs it: ``version='standard'`` of fra31/auto-attack.

Four attacks in turn, each on the points still robust after the previous ones: APGD-CE, APGD-T (targeted
DLR), FAB-T and Square. A point counts as robust only if it survives all of them (the worst case per
point). The attacks themselves are torchattacks' (3.5.1) classes; their defaults differ from the
reference (10 steps, all n_classes-1 targets, Square's rescaled schedule), so every count is passed
explicitly from :data:`REFERENCE_COUNTS`, the values ``AutoAttack(version='standard')`` sets for Linf
and L2 (autoattack.py: ``__init__`` and ``set_version``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from convforge.errors import ConfigError

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
TORCHATTACKS_PIN = "torchattacks==3.5.1"
INSTALL_HINT = (f"pip install --no-deps {TORCHATTACKS_PIN} (--no-deps because its metadata pins requests~=2.25.1 "
                "and torchvision, which would downgrade requests and replace the installed torch)")
# Slack for float rounding when checking that adversarial images stay within eps and [0, 1].
TOLERANCE = 1e-5


@dataclass(frozen=True)
class AutoAttackCounts:
    """The iteration, restart, target and query counts of the four attacks (defaults: the reference's)."""

    apgd_steps: int = 100           # APGDAttack(n_iter=100)
    apgd_restarts: int = 1          # set_version('standard'): apgd.n_restarts = 1 (Linf, L2)
    apgd_rho: float = 0.75          # rho=.75
    apgdt_steps: int = 100          # APGDAttack_targeted(n_iter=100)
    apgdt_targets: int = 9          # apgd_targeted.n_target_classes = 9
    apgdt_restarts: int = 1         # apgd_targeted.n_restarts = 1
    fab_steps: int = 100            # FABAttack_PT(n_iter=100)
    fab_targets: int = 9            # fab.n_target_classes = 9
    fab_restarts: int = 1           # fab.n_restarts = 1
    square_queries: int = 5000      # square.n_queries = 5000
    square_p_init: float = 0.8      # SquareAttack(p_init=.8)
    square_restarts: int = 1        # n_restarts=1
    square_rescale_schedule: bool = False  # resc_schedule=False (torchattacks' default is True)


REFERENCE_COUNTS = AutoAttackCounts()


@dataclass
class AutoAttackResult:
    """``adversarial``: the worst case found per point (the clean image where no attack succeeded);
    ``clean``: correctly classified clean points; ``robust``: (stage, still-robust mask) after each
    attack, each mask a subset of the one before; ``seconds``: time per stage."""

    adversarial: torch.Tensor
    clean: torch.Tensor
    robust: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> torch.Tensor:
        """Points robust to every attack."""
        return self.robust[-1][1] if self.robust else self.clean


def require_torchattacks() -> Any:
    """The torchattacks module, or a ConfigError saying how to install it without touching torch."""
    try:
        import torchattacks
    except ImportError:
        raise ConfigError(f"AutoAttack needs torchattacks: {INSTALL_HINT}") from None
    return torchattacks


def build_attacks(model: nn.Module, eps: float, norm: str, n_classes: int, counts: AutoAttackCounts = REFERENCE_COUNTS,
                  seed: int = 0) -> dict[str, Any]:
    """The four torchattacks objects of the standard protocol, with every count set from ``counts``;
    targets capped at ``n_classes - 1``."""
    if norm not in ("linf", "l2"):
        raise ConfigError(f"AutoAttack supports norm linf or l2, got {norm!r}")
    ta = require_torchattacks()
    name = {"linf": "Linf", "l2": "L2"}[norm]
    targets = max(1, min(n_classes - 1, counts.apgdt_targets)), max(1, min(n_classes - 1, counts.fab_targets))
    attacks = {
        "apgd-ce": ta.APGD(model, norm=name, eps=eps, steps=counts.apgd_steps, n_restarts=counts.apgd_restarts,
                           seed=seed, loss="ce", eot_iter=1, rho=counts.apgd_rho),
        "apgd-t": ta.APGDT(model, norm=name, eps=eps, steps=counts.apgdt_steps, n_restarts=counts.apgdt_restarts,
                           seed=seed, eot_iter=1, rho=counts.apgd_rho, n_classes=n_classes),
        "fab-t": ta.FAB(model, norm=name, eps=eps, steps=counts.fab_steps, n_restarts=counts.fab_restarts,
                        seed=seed, multi_targeted=True, n_classes=n_classes),
        "square": ta.Square(model, norm=name, eps=eps, n_queries=counts.square_queries,
                            n_restarts=counts.square_restarts, p_init=counts.square_p_init, loss="margin",
                            resc_schedule=counts.square_rescale_schedule, seed=seed),
    }
    attacks["apgd-t"].n_target_classes, attacks["fab-t"].n_target_classes = targets
    return attacks


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
                   n_classes: int, counts: AutoAttackCounts = REFERENCE_COUNTS, seed: int = 0) -> AutoAttackResult:
    """AutoAttack on images ``x`` on [0, 1] (``model``: a classifier of such images, in eval mode).

    Each attack runs only on the points still robust; a point's adversarial image is the first successful
    one. The attacks reseed torch's global generator; the caller's random state is restored afterwards.
    """
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    result = AutoAttackResult(x.clone(), clean)
    robust = clean.clone()
    attacks = build_attacks(model, eps, norm, n_classes, counts, seed)
    devices = [x.device] if x.device.type == "cuda" else []
    for stage in STAGES:
        start = time.perf_counter()
        index = robust.nonzero().flatten()
        if len(index):
            with torch.random.fork_rng(devices=devices):
                candidate = attacks[stage](x[index], y[index]).detach().to(x.dtype)
            candidate = checked_adversarial(x[index], candidate, eps, norm, stage)
            with torch.no_grad():
                fooled = model(candidate).argmax(1) != y[index]
            result.adversarial[index[fooled]] = candidate[fooled]
            robust = robust.clone()
            robust[index[fooled]] = False
        result.robust.append((stage, robust))
        result.seconds[stage] = time.perf_counter() - start
    return result


def checked_adversarial(x: torch.Tensor, adv: torch.Tensor, eps: float, norm: str, attack: str = "attack",
                        tolerance: float = TOLERANCE) -> torch.Tensor:
    """``adv`` projected onto the ``norm`` ball of radius ``eps`` around ``x`` and onto [0, 1]; a RuntimeError
    when it was outside by more than ``tolerance`` (float rounding is all the projection may repair)."""
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if not bool(torch.isfinite(adv).all()):
        raise RuntimeError(f"{attack} returned non-finite pixels")
    worst = float(size.max()) if size.numel() else 0.0
    low, high = (float(adv.min()), float(adv.max())) if adv.numel() else (0.0, 1.0)
    if worst > eps + tolerance or low < -tolerance or high > 1 + tolerance:
        raise RuntimeError(f"{attack} returned images outside the {norm} ball of radius {eps:.6g} or [0, 1]: "
                           f"largest perturbation {worst:.6g}, pixel range [{low:.6g}, {high:.6g}]")
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta.view_as(x)).clamp(0, 1)
