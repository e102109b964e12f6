"""``evaluate_robustness``: clean, attacked and corrupted accuracy of a classifier on the same seeded points."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from convforge.errors import ConfigError
from convforge.measure.attacks import NormalizedClassifier
from convforge.measure.autoattack import REFERENCE_COUNTS, AutoAttackCounts
from convforge.robust.evaluation import (DEFAULT_STEPS, _Run, clean_correct, eps_values, evaluate_attack,
                                         indices_crc, log_function, plan_attacks, write_outputs)
from convforge.robust.points import select_points
from convforge.robust.resume import ProgressLog, model_fingerprint


def evaluate_robustness(
    loaded: Any,
    data: Any,
    *,
    split: str = "test",
    attacks: Sequence[str] = ("pgd",),
    eps: Sequence[float | str] = (8 / 255,),
    norm: str = "linf",
    samples: int | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    step_size: float | None = None,
    restarts: int = 1,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    progress: bool = True,
    autoattack_counts: AutoAttackCounts | None = None,
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] = (1, 2, 3, 4, 5),
    baseline: Any = None,
    corruption_params: str = "auto",
) -> dict[str, Any]:
    """Clean accuracy, robust accuracy per attack and eps, and accuracy per corruption and severity of ``loaded``
    (a LoadedModel classifier) on ``samples`` images of ``split`` of ``data`` (a spec or a loaded dataset) drawn
    by ``seed``.

    Attacks: ``fgsm``, ``pgd`` (``steps``, ``step_size`` default 2.5 * eps / steps, random start, ``restarts``),
    ``pgd-l2`` and ``autoattack`` (the standard protocol; ``autoattack_counts`` overrides the reference counts).
    ``corruptions`` ("all" or names of convforge.data.corruptions) at ``severities``; with ``baseline`` (another
    LoadedModel scored on the same corrupted images) also CE per corruption, mCE and relative mCE.
    With ``out_dir`` every finished chunk of ``batch_size`` points is recorded in robust-progress.json (a rerun
    skips it) and the result is written to robust.json (plus robust-curve.png for several eps and
    robust-corruptions.png for corruptions).
    """
    started = time.perf_counter()
    for model in (loaded, baseline):
        if model is not None and getattr(model, "task", "classify") != "classify":
            raise ConfigError(f"{model.label} is a {model.task} model: robust evaluation is for classifiers")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    plans = plan_attacks(attacks, norm, steps, step_size, restarts, allow_none=corruptions is not None)
    sizes = eps_values(eps, plans) if plans else []
    names, levels = _corruption_plan(corruptions, severities, corruption_params, baseline, loaded)
    echo = log_function(progress)
    if isinstance(data, str):
        from convforge.train.inference import load_eval_data

        data = load_eval_data(loaded, data)
    from convforge.train.inference import normalization_for

    notes: list[str] = list(loaded.notes) + list(getattr(data, "notes", []))
    mean, std = normalization_for(loaded, data, notes)
    points = select_points(loaded, data, split, samples, seed, notes)
    device = torch.device(device)
    model = NormalizedClassifier(loaded.model.float().eval(), mean, std).to(device).eval()
    config = {"model": loaded.label, "weights": model_fingerprint(loaded.model), "mean": list(mean),
              "std": list(std), "data": data.spec, "split": split, "samples": len(points), "seed": seed,
              "indices": indices_crc(points.indices), "batch_size": batch_size, "device": device.type}
    log = ProgressLog(out_dir, config, echo)
    run = _Run(model, points, torch.zeros(0, dtype=torch.bool), batch_size, device, seed, len(loaded.classes),
               autoattack_counts or REFERENCE_COUNTS, log, progress)
    began = time.perf_counter()
    run.clean = clean_correct(model, run)
    clean_seconds = time.perf_counter() - began
    rows = [evaluate_attack(run, plan, text, value) for plan in plans for text, value in sizes]
    section = _corruption_section(run, names, levels, corruption_params, baseline, data, notes) if names else None
    if log.skipped:
        echo(f"skipped {log.skipped} chunks finished by an earlier run with the same arguments ({log.path})")
    n = len(points)
    result: dict[str, Any] = {
        "model": loaded.name, "source": loaded.label, "data": data.spec, "split": split, "samples": n,
        "split_size": points.split_size, "seed": seed, "norm": norm, "eps": [v for _, v in sizes],
        "eps_text": [t for t, _ in sizes], "attacks": [p.name if p.norm == norm else f"{p.name}-{p.norm}" for p in plans],
        "batch_size": batch_size, "mean": list(mean), "std": list(std),
        "clean": {"accuracy": 100.0 * int(run.clean.sum()) / n, "correct": int(run.clean.sum()), "points": n},
        "results": rows, "resume": {"skipped_chunks": log.skipped, "note": log.note},
        "timings": {"clean": round(clean_seconds, 3), "attacks": round(sum(r["seconds"] for r in rows), 3),
                    "total": round(time.perf_counter() - started, 3)},
        "notes": notes,
    }
    if section is not None:
        result["corruption"] = section
        result["timings"]["corruptions"] = round(sum(r["seconds"] for r in section["rows"]), 3)
    if samples is not None:
        result["indices"] = points.indices.tolist()
    if out_dir is not None:
        result["files"] = write_outputs(result, out_dir)
    return result


def _corruption_plan(corruptions: str | Sequence[str] | None, severities: str | Sequence[int], params: str,
                     baseline: Any, loaded: Any) -> tuple[list[str], list[int]]:
    """The corruption names and severities to evaluate (none without ``corruptions``); clear errors."""
    if corruptions is None:
        if baseline is not None:
            raise ConfigError("--baseline is for corruption errors (mCE): add --corruptions all (or names)")
        return [], []
    from convforge.data.corruptions import PARAMS
    from convforge.robust.corruption import corruption_names, parse_severities

    if params not in PARAMS:
        raise ConfigError(f"corruption parameters must be one of {', '.join(PARAMS)}, got {params!r}")
    if baseline is not None and (list(baseline.classes) != list(loaded.classes)
                                 or baseline.input_size[0] != loaded.input_size[0]):
        raise ConfigError(f"the baseline {baseline.label} has other classes or channels than {loaded.label}: "
                          "CE compares models of the same classes, in the same order, on the same images")
    return corruption_names(corruptions), parse_severities(severities)


def _corruption_section(run: _Run, names: list[str], levels: list[int], params: str, baseline: Any, data: Any,
                        notes: list[str]) -> dict[str, Any]:
    from convforge.robust.corruption import evaluate_corruptions
    from convforge.train.inference import normalization_for

    base_model = base_clean = fingerprint = None
    if baseline is not None:
        base_notes: list[str] = []
        mean, std = normalization_for(baseline, data, base_notes)
        notes.extend(f"baseline: {note}" for note in base_notes)
        base_model = NormalizedClassifier(baseline.model.float().eval(), mean, std).to(run.device).eval()
        fingerprint = f"{model_fingerprint(baseline.model)}:{','.join(f'{v:.6g}' for v in (*mean, *std))}"
        base_clean = clean_correct(base_model, run)
    section = evaluate_corruptions(run, names, levels, params, base_model, fingerprint, base_clean)
    if baseline is not None:
        section["baseline"] = baseline.label
    return section
