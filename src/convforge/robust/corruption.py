"""Accuracy under the 15 common corruptions x 5 severities, and Hendrycks & Dietterich's (2019) CE and mCE.

The evaluated points are corrupted chunk by chunk with ``first_index`` = the chunk's first position among the
points, so every image gets the same corruption whatever the batch size. A baseline model (their AlexNet's role)
is scored on the very same corrupted images:

    CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}                     mCE = mean_c CE_c
    relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from convforge.errors import ConfigError
from convforge.progress import progress_iter
from convforge.robust.resume import bits, entry_key, from_bits


def corruption_names(names: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma-separated string or a sequence of names, checked against CORRUPTIONS."""
    from convforge.data.corruptions import CORRUPTIONS

    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    items = [n for n in items if n]
    if items == ["all"]:
        return list(CORRUPTIONS)
    unknown = [n for n in items if n not in CORRUPTIONS]
    if unknown or not items:
        raise ConfigError(f"unknown corruption {', '.join(map(repr, unknown)) or '(none given)'}: "
                          f"give all or some of {', '.join(CORRUPTIONS)}")
    return list(dict.fromkeys(items))


def parse_severities(text: str | Sequence[int]) -> list[int]:
    """``"1-5"``, ``"1,3,5"`` or a sequence of ints, each in 1..5."""
    values: list[int] = []
    try:
        if isinstance(text, str):
            for part in (p.strip() for p in text.split(",") if p.strip()):
                low, _, high = part.partition("-")
                values.extend(range(int(low), int(high or low) + 1))
        else:
            values = [int(v) for v in text]
    except ValueError:
        values = [0]
    if not values or any(v not in (1, 2, 3, 4, 5) for v in values):
        raise ConfigError(f"--severities {text!r}: give severities in 1..5, e.g. 1-5 or 1,3,5")
    return sorted(set(values))


def _ratio(numerator: float, denominator: float) -> float | None:
    return 100.0 * numerator / denominator if denominator > 0 else None


def corruption_summary(errors: dict[tuple[str, int], float], clean_error: float,
                       baseline_errors: dict[tuple[str, int], float] | None = None,
                       baseline_clean_error: float | None = None) -> dict[str, Any]:
    """Mean accuracy per corruption and overall; with a baseline, CE_c, mCE and relative CE_c / mCE (all in %).

    ``errors`` maps (corruption, severity) to the error rate in % (100 - accuracy). A CE whose denominator is 0
    (the baseline makes no errors) is None and left out of the mean.
    """
    names = list(dict.fromkeys(c for c, _ in errors))
    per: list[dict[str, Any]] = []
    for name in names:
        severities = sorted(s for c, s in errors if c == name)
        record: dict[str, Any] = {"corruption": name,
                                  "accuracy": 100.0 - float(np.mean([errors[name, s] for s in severities]))}
        if baseline_errors is not None and baseline_clean_error is not None:
            own = sum(errors[name, s] for s in severities)
            base = sum(baseline_errors[name, s] for s in severities)
            record["ce"] = _ratio(own, base)
            record["relative_ce"] = _ratio(own - len(severities) * clean_error,
                                           base - len(severities) * baseline_clean_error)
        per.append(record)
    summary: dict[str, Any] = {"per_corruption": per,
                               "mean_accuracy": 100.0 - float(np.mean(list(errors.values()))) if errors else None}
    if baseline_errors is not None:
        for key, field in (("mce", "ce"), ("relative_mce", "relative_ce")):
            values = [r[field] for r in per if r.get(field) is not None]
            summary[key] = float(np.mean(values)) if values else None
    return summary


def corrupted_chunk(images: torch.Tensor, name: str, severity: int, seed: int, first_index: int,
                    params: str) -> torch.Tensor:
    """uint8 (N, C, H, W) images corrupted by ``name`` at ``severity`` (image i drawn as ``first_index + i``)."""
    from convforge.data.corruptions import corrupt

    array = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())
    out = corrupt(array, name, severity, seed, params=params, first_index=first_index)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()


def evaluate_corruption(run: Any, name: str, severity: int, params: str, baseline: torch.nn.Module | None,
                        baseline_fingerprint: str | None) -> dict[str, Any]:
    """Accuracy of the model (and the baseline) on every chunk of the points corrupted by ``name`` at ``severity``."""
    correct: list[torch.Tensor] = []
    base_correct: list[torch.Tensor] = []
    seconds, reused = 0.0, 0
    chunks = run.chunks()
    label = f"{name} severity {severity}"
    for start, stop in progress_iter(chunks, len(chunks), label) if run.progress else chunks:
        fields = {"corruption": name, "severity": severity, "params": params, "baseline": baseline_fingerprint,
                  "start": start, "stop": stop}
        key = entry_key(**fields)
        entry = run.log.get(key)
        if entry is None:
            began = time.perf_counter()
            images, labels = run.points.chunk(start, stop)
            x = corrupted_chunk(images, name, severity, run.seed, start, params).to(run.device).float().div_(255)
            y = labels.to(run.device)
            with torch.no_grad():
                entry = {**fields, "correct": bits((run.model(x).argmax(1) == y).cpu())}
                if baseline is not None:
                    entry["baseline_correct"] = bits((baseline(x).argmax(1) == y).cpu())
            entry["seconds"] = round(time.perf_counter() - began, 4)
            run.log.put(key, entry)
        else:
            reused += 1
        correct.append(from_bits(entry["correct"]))
        if baseline is not None:
            base_correct.append(from_bits(entry["baseline_correct"]))
        seconds += entry["seconds"]
    n = len(run.points)
    row: dict[str, Any] = {"corruption": name, "severity": severity, "accuracy": 100.0 * int(torch.cat(correct).sum()) / n,
                           "points": n, "seconds": round(seconds, 3), "resumed_chunks": reused}
    if baseline is not None:
        row["baseline_accuracy"] = 100.0 * int(torch.cat(base_correct).sum()) / n
    return row


def evaluate_corruptions(run: Any, names: Sequence[str], severities: Sequence[int], params: str,
                         baseline: torch.nn.Module | None, baseline_fingerprint: str | None,
                         baseline_clean: torch.Tensor | None) -> dict[str, Any]:
    """Every (corruption, severity) row, the mean corruption accuracy and, with a baseline, CE and mCE."""
    from convforge.data.corruptions import DEVIATIONS

    rows = [evaluate_corruption(run, name, severity, params, baseline, baseline_fingerprint)
            for name in names for severity in severities]
    n = len(run.points)
    errors = {(r["corruption"], r["severity"]): 100.0 - r["accuracy"] for r in rows}
    clean_error = 100.0 - 100.0 * int(run.clean.sum()) / n
    section: dict[str, Any] = {"corruptions": list(names), "severities": list(severities), "params": params,
                               "seed": run.seed, "rows": rows}
    if baseline is not None and baseline_clean is not None:
        base_errors = {(r["corruption"], r["severity"]): 100.0 - r["baseline_accuracy"] for r in rows}
        base_clean_error = 100.0 - 100.0 * int(baseline_clean.sum()) / n
        section.update(corruption_summary(errors, clean_error, base_errors, base_clean_error))
        section["baseline_clean_accuracy"] = 100.0 - base_clean_error
    else:
        section.update(corruption_summary(errors, clean_error))
    section["deviations"] = {name: DEVIATIONS[name] for name in names if name in DEVIATIONS}
    return section
