"""Robust accuracy of a classifier under white-box attacks on a seeded subset of a split, resumable per chunk."""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from convforge.errors import ConfigError
from convforge.measure.attacks import parse_eps, pgd
from convforge.measure.autoattack import STAGES, AutoAttackCounts, checked_adversarial, run_autoattack
from convforge.progress import echo, progress_iter
from convforge.robust.points import PointSet
from convforge.robust.resume import ProgressLog, bits, derived_seed, entry_key, from_bits

ATTACKS = ("fgsm", "pgd", "pgd-l2", "autoattack")
NORMS = ("linf", "l2")
DEFAULT_STEPS = 20
RESULT_FILE = "robust.json"
CURVE_FILE = "robust-curve.png"
HEATMAP_FILE = "robust-corruptions.png"


@dataclass(frozen=True)
class AttackPlan:
    """One attack as it runs: its name, norm and the counts that define its result."""

    name: str
    norm: str
    steps: int = 1
    step_size: float | None = None  # None: 2.5 * eps / steps (PGD), eps (FGSM)
    restarts: int = 1

    def fields(self, counts: AutoAttackCounts) -> dict[str, Any]:
        if self.name == "autoattack":
            return {"attack": self.name, "norm": self.norm, "counts": counts.__dict__}
        return {"attack": self.name, "norm": self.norm, "steps": self.steps, "step_size": self.step_size,
                "restarts": self.restarts}


def plan_attacks(attacks: Sequence[str], norm: str, steps: int, step_size: float | None,
                 restarts: int, allow_none: bool = False) -> list[AttackPlan]:
    """The attacks named (``fgsm``, ``pgd``, ``pgd-l2``, ``autoattack``) with their settings; clear errors
    (no attack at all is one unless ``allow_none``)."""
    if norm not in NORMS:
        raise ConfigError(f"--norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if steps < 1 or restarts < 1:
        raise ConfigError(f"--steps and --restarts must be >= 1, got {steps} and {restarts}")
    if step_size is not None and step_size <= 0:
        raise ConfigError(f"--step-size must be > 0, got {step_size}")
    plans = []
    for name in attacks:
        name = name.strip().lower()
        if name not in ATTACKS:
            raise ConfigError(f"unknown attack {name!r}: choose from {', '.join(ATTACKS)}")
        if name == "fgsm":
            plans.append(AttackPlan("fgsm", norm))
        elif name == "autoattack":
            plans.append(AttackPlan("autoattack", norm, steps=0, restarts=0))
        else:
            plans.append(AttackPlan("pgd", "l2" if name == "pgd-l2" else norm, steps, step_size, restarts))
    if not plans and not allow_none:
        raise ConfigError(f"no attack given: choose from {', '.join(ATTACKS)}")
    return list(dict.fromkeys(plans))


def eps_values(eps: Sequence[float | str], plans: Sequence[AttackPlan]) -> list[tuple[str, float]]:
    """(text, value) of each perturbation size; > 0, and <= 1 where an attack uses the Linf norm."""
    values = []
    for item in eps:
        try:
            value = parse_eps(item)
        except ValueError as exc:
            raise ConfigError(f"--eps: {exc}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--eps {item}: a perturbation size must be > 0 (e.g. 8/255)")
        if value > 1 and any(plan.norm == "linf" for plan in plans):
            raise ConfigError(f"--eps {item}: a Linf perturbation larger than 1 exceeds the pixel range [0, 1]; "
                              "give a size on the [0, 1] scale such as 8/255")
        values.append((item if isinstance(item, str) else eps_text(value), value))
    if not values:
        raise ConfigError("--eps: give at least one perturbation size, e.g. 8/255")
    return list(dict.fromkeys(values))


def eps_text(value: float) -> str:
    """``8/255`` for multiples of 1/255, else the shortest float text."""
    steps = value * 255
    return f"{round(steps)}/255" if round(steps) and abs(steps - round(steps)) < 1e-6 else f"{value:g}"


def attack_chunk(model: torch.nn.Module, plan: AttackPlan, eps: float, x: torch.Tensor, y: torch.Tensor,
                 clean: torch.Tensor, seed: int, n_classes: int,
                 counts: AutoAttackCounts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Robust points of one chunk (clean-correct and still correct after the attack) and, for AutoAttack,
    the robust points after each stage. Only clean-correct points are attacked."""
    index = clean.nonzero().flatten()
    robust = clean.clone()
    if plan.name == "autoattack":
        stages = {stage: clean.clone() for stage in STAGES}
        if len(index):
            result = run_autoattack(model, x[index], y[index], eps, norm=plan.norm, n_classes=n_classes,
                                    counts=counts, seed=seed)
            for stage, mask in result.robust:
                stages[stage][index] = mask
        return stages[STAGES[-1]].clone(), stages
    if len(index):
        generator = torch.Generator(device=x.device).manual_seed(seed)
        random_start = plan.name != "fgsm"
        size = plan.step_size if plan.step_size is not None else (eps if plan.name == "fgsm" else None)
        adv = pgd(model, x[index], y[index], eps, norm=plan.norm, steps=plan.steps, step_size=size,
                  random_start=random_start, restarts=plan.restarts, generator=generator)
        adv = checked_adversarial(x[index], adv, eps, plan.norm, plan.name)
        with torch.no_grad():
            robust[index] = model(adv).argmax(1) == y[index]
    return robust, {}


@dataclass
class _Run:
    """What every chunk of one evaluation shares."""

    model: torch.nn.Module
    points: PointSet
    clean: torch.Tensor
    batch_size: int
    device: torch.device
    seed: int
    n_classes: int
    counts: AutoAttackCounts
    log: ProgressLog
    progress: bool

    def chunks(self) -> list[tuple[int, int]]:
        n = len(self.points)
        return [(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)]

    def images(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.points.chunk(start, stop)
        return images.to(self.device).float().div_(255), labels.to(self.device)


def clean_correct(model: torch.nn.Module, run: _Run) -> torch.Tensor:
    """Whether each point is classified correctly without attack."""
    correct = []
    with torch.no_grad():
        for start, stop in run.chunks():
            x, y = run.images(start, stop)
            correct.append((model(x).argmax(1) == y).cpu())
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def evaluate_attack(run: _Run, plan: AttackPlan, text: str, eps: float) -> dict[str, Any]:
    """One attack at one eps over every chunk (reusing recorded chunks): the table row."""
    robust, stages, seconds, reused = [], {s: [] for s in STAGES}, 0.0, 0
    chunks = run.chunks()
    label = f"{plan.name} {plan.norm} eps={text}"
    for start, stop in progress_iter(chunks, len(chunks), label) if run.progress else chunks:
        fields = {**plan.fields(run.counts), "eps": repr(eps), "start": start, "stop": stop}
        key = entry_key(**fields)
        entry = run.log.get(key)
        if entry is None:
            began = time.perf_counter()
            x, y = run.images(start, stop)
            seed = derived_seed(run.seed, entry_key(attack=plan.name, norm=plan.norm, eps=repr(eps), start=start))
            mask, stage_masks = attack_chunk(run.model, plan, eps, x, y, run.clean[start:stop].to(run.device),
                                             seed, run.n_classes, run.counts)
            entry = {**fields, "robust": bits(mask), "stages": {s: bits(m) for s, m in stage_masks.items()},
                     "seconds": round(time.perf_counter() - began, 4)}
            run.log.put(key, entry)
        else:
            reused += 1
        robust.append(from_bits(entry["robust"]))
        for stage, text_bits in entry["stages"].items():
            stages[stage].append(from_bits(text_bits))
        seconds += entry["seconds"]
    n = len(run.points)
    mask = torch.cat(robust) if robust else torch.zeros(0, dtype=torch.bool)
    row: dict[str, Any] = {"attack": plan.name, "norm": plan.norm, "eps": eps, "eps_text": text,
                           "robust_accuracy": 100.0 * int(mask.sum()) / n, "robust": int(mask.sum()), "points": n,
                           "seconds": round(seconds, 3), "chunks": len(chunks), "resumed_chunks": reused}
    if plan.name == "autoattack":
        row["counts"] = run.counts.__dict__.copy()
        row["stages"] = [{"stage": s, "robust_accuracy": 100.0 * int(torch.cat(m).sum()) / n, "robust": int(torch.cat(m).sum())}
                         for s, m in stages.items() if m]
    else:
        row.update(steps=plan.steps, restarts=plan.restarts,
                   step_size=plan.step_size if plan.step_size is not None else
                   (eps if plan.name == "fgsm" else 2.5 * eps / plan.steps))
    return row


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """robust.json, robust-curve.png (several eps) and robust-corruptions.png (corruptions) in ``out_dir``
    (atomic writes); their paths."""
    from convforge.fileio import atomic_write_bytes, atomic_write_json
    from convforge.robust.plots import accuracy_curve, corruption_heatmap

    folder = Path(out_dir)
    files = {"robust": str(folder / RESULT_FILE)}
    if len(result["eps"]) > 1:
        files["curve"] = str(atomic_write_bytes(folder / CURVE_FILE, accuracy_curve(result)))
    if result.get("corruption"):
        files["heatmap"] = str(atomic_write_bytes(folder / HEATMAP_FILE, corruption_heatmap(result)))
    atomic_write_json(folder / RESULT_FILE, {**result, "files": files})
    return files


def indices_crc(indices: torch.Tensor) -> str:
    return f"{zlib.crc32(indices.to(torch.int64).numpy().tobytes()):08x}"


def log_function(progress: bool) -> Callable[[str], None]:
    return echo if progress else (lambda message: None)
