"""The report's robustness section: what ``convforge robust CKPT --out DIR`` wrote, for DIR = the run directory
or ``RUN/robust``.

It reads ``robust.json`` (looked for as ``RUN/robust.json`` and ``RUN/robust/robust.json``), the accuracy-vs-eps
picture ``robust-curve.png`` and the corruption heat map ``robust-corruptions.png`` beside it, by their keys and
names only (convforge.robust is a sibling feature package, never imported). It shows the clean accuracy, a table
of robust accuracy per attack and eps, AutoAttack's accuracy after each stage, the accuracy-vs-eps curve (drawn
here when the PNG is missing), the corruption table (accuracy per corruption and severity, mean, CE and mCE
against a baseline) when there is one, and the subset the numbers hold for. A missing key shows as "-", a
broken file as a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convforge.report import plots
from convforge.report.markup import esc, fmt, img, notes, table
from convforge.report.sidecars import number, read_png, records, sections

PLACES = ("robust.json", "robust/robust.json")
CURVE_FILE = "robust-curve.png"
HEATMAP_FILE = "robust-corruptions.png"


def robustness_section(run_path: Path) -> str:
    """The section for every robust.json of the run directory ("" when there is none)."""
    parts = sections(run_path, PLACES, "convforge robust", _one_result)
    if not parts:
        return ""
    return "<h3>Robustness (convforge robust)</h3>" + "".join(parts)


def _one_result(result: dict[str, Any], folder: Path, shown: str) -> str:
    clean = result.get("clean") if isinstance(result.get("clean"), dict) else {}
    rows = records(result.get("results"))
    out = [f'<p class="sub">From {esc(shown)}: {esc(result.get("model", "?"))} ({esc(result.get("source", "?"))}), '
           f"{esc(result.get('norm', '?'))} threat model; clean accuracy "
           f"<b>{esc(fmt(clean.get('accuracy'), 'pct'))}</b> ({esc(_ratio(clean.get('correct'), clean.get('points')))}"
           " correct).</p>",
           notes(n for n in (result.get("notes") or []) if isinstance(n, str))]
    if rows:
        out.append(attack_table(result, clean, rows))
        out.append(stage_table(result, clean, rows))
        out.append(_curve(result, clean, rows, folder))
    elif not isinstance(result.get("corruption"), dict):
        out.append(notes([f"{shown} holds no attack results"]))
    if isinstance(result.get("corruption"), dict):
        out.append(corruption_block(result, result["corruption"], folder))
    out.append(f'<p class="sub">{esc(caveat(result))}</p>')
    return "".join(out)


def _ratio(part: Any, whole: Any) -> str:
    return f"{part}/{whole}" if number(part) and number(whole) else "-"


def _attack_name(row: dict[str, Any], norm: Any) -> str:
    name = str(row.get("attack", "?"))
    return name if row.get("norm") in (None, norm) else f"{name} ({row['norm']})"


def _eps(row: dict[str, Any]) -> tuple[str, str]:
    """The eps as written (8/255) for a table cell, kept on one line."""
    return "html", esc(row.get("eps_text") or fmt(row.get("eps")))


def settings(row: dict[str, Any]) -> str:
    """The attack's counts in a few words: PGD steps, step size and restarts; AutoAttack's stage budgets."""
    if row.get("attack") == "fgsm":
        return "one step of size eps"
    counts = row.get("counts")
    if isinstance(counts, dict):
        standard = _standard_counts(counts)
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()
                          if k.endswith(("steps", "targets", "queries")))
        return "standard AutoAttack counts" if standard else f"reduced counts: {shown}"
    parts = [f"{row['steps']} steps" if number(row.get("steps")) else "",
             f"step {fmt(row['step_size'])}" if number(row.get("step_size")) else "",
             f"{row['restarts']} restart{'s' if row['restarts'] != 1 else ''}" if number(row.get("restarts")) else ""]
    return ", ".join(p for p in parts if p) or "-"


def _standard_counts(counts: dict[str, Any]) -> bool:
    """Whether AutoAttack ran with the reference counts of its standard version."""
    from dataclasses import asdict

    try:
        from convforge.measure.autoattack import REFERENCE_COUNTS
    except ImportError:  # torch missing: say nothing about the counts being standard
        return False
    return counts == asdict(REFERENCE_COUNTS)


def attack_table(result: dict[str, Any], clean: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Clean accuracy, then one row per attack and eps: robust accuracy, robust points, settings and time."""
    body = [("clean (no attack)", "0", fmt(clean.get("accuracy"), "pct"),
             _ratio(clean.get("correct"), clean.get("points")), "-", "-")]
    for row in rows:
        seconds = f"{row['seconds']:.1f} s" if number(row.get("seconds")) else "-"
        body.append((_attack_name(row, result.get("norm")), _eps(row), fmt(row.get("robust_accuracy"), "pct"),
                     _ratio(row.get("robust"), row.get("points")), settings(row), seconds))
    return table(("attack", "eps", "robust accuracy", "robust / points", "settings", "time"), body,
                 numeric=(1, 2, 3, 5))


def stage_table(result: dict[str, Any], clean: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """AutoAttack's accuracy after each of its stages, one row per eps ("" without AutoAttack stages)."""
    staged = [row for row in rows if records(row.get("stages"))]
    if not staged:
        return ""
    names: list[str] = []
    for row in staged:
        names += [str(s.get("stage")) for s in records(row["stages"]) if str(s.get("stage")) not in names]
    body = []
    for row in staged:
        after = {str(s.get("stage")): s.get("robust_accuracy") for s in records(row["stages"])}
        body.append((_attack_name(row, result.get("norm")), _eps(row), fmt(clean.get("accuracy"), "pct"),
                     *(fmt(after.get(name), "pct") for name in names)))
    return ("<h4>AutoAttack: accuracy after each stage</h4>"
            '<p class="sub">Each stage attacks only the points still robust after the stages before it; the last '
            "column is AutoAttack's robust accuracy.</p>"
            + table(("attack", "eps", "clean", *(f"after {n}" for n in names)), body,
                    numeric=range(1, 3 + len(names))))


def _curve(result: dict[str, Any], clean: dict[str, Any], rows: list[dict[str, Any]], folder: Path) -> str:
    """The accuracy-vs-eps picture beside robust.json, else drawn here when there are several eps."""
    files = result.get("files") if isinstance(result.get("files"), dict) else {}
    picture = read_png(folder, files.get("curve")) or read_png(folder, CURVE_FILE)
    if picture is None:
        lines: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            if number(row.get("eps")) and number(row.get("robust_accuracy")):
                lines.setdefault(_attack_name(row, None), []).append((row["eps"], row["robust_accuracy"]))
        if len({eps for points in lines.values() for eps, _ in points}) < 2:
            return ""
        accuracy = clean.get("accuracy") if number(clean.get("accuracy")) else None
        picture = plots.accuracy_eps(lines, accuracy, f"{result.get('model', '?')}: accuracy against eps")
    return img(picture, "robust accuracy against eps",
               "accuracy against the perturbation size eps, one line per attack (eps 0: clean accuracy)")


def corruption_block(result: dict[str, Any], section: dict[str, Any], folder: Path) -> str:
    """Accuracy per corruption and severity with the mean per corruption (and CE with a baseline), the
    summary line (mean corruption accuracy, mCE, relative mCE) and the heat map."""
    rows = records(section.get("rows"))
    per = {str(r.get("corruption")): r for r in records(section.get("per_corruption"))}
    levels = [v for v in _list(section.get("severities")) if number(v)]
    levels = levels or sorted({r["severity"] for r in rows if number(r.get("severity"))})
    names = [str(n) for n in _list(section.get("corruptions"))]
    names = names or list(dict.fromkeys([*(str(r.get("corruption")) for r in rows), *per]))
    accuracy = {(str(r.get("corruption")), r.get("severity")): r.get("accuracy") for r in rows}
    with_ce = "mce" in section or any("ce" in r for r in per.values())
    body = []
    for name in names:
        cells = [fmt(accuracy.get((name, level)), "pct") for level in levels]
        cells.append(fmt(per.get(name, {}).get("accuracy"), "pct"))
        if with_ce:
            cells += [fmt(per.get(name, {}).get(key), "pct") for key in ("ce", "relative_ce")]
        body.append((name, *cells))
    headers = ("corruption", *(f"severity {v}" for v in levels), "mean", *(("CE", "relative CE") if with_ce else ()))
    out = ["<h4>Common corruptions: accuracy per corruption and severity</h4>",
           f'<p class="sub">{esc(summary_line(section))}</p>',
           table(headers, body, numeric=range(1, len(headers)))]
    files = result.get("files") if isinstance(result.get("files"), dict) else {}
    picture = read_png(folder, files.get("heatmap")) or read_png(folder, HEATMAP_FILE)
    out.append(img(picture, "accuracy per corruption and severity", "accuracy (%) per corruption and severity"))
    deviations = section.get("deviations")
    if isinstance(deviations, dict) and deviations:
        items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in deviations.items())
        out.append(f"<details><summary>where the corruptions differ from the reference ({len(deviations)})"
                   f"</summary><ul>{items}</ul></details>")
    return "".join(out)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def summary_line(section: dict[str, Any]) -> str:
    """Mean corruption accuracy; with a baseline, mCE and relative mCE against it."""
    line = f"Mean corruption accuracy {fmt(section.get('mean_accuracy'), 'pct')}"
    if "mce" in section or "relative_mce" in section:
        baseline = section.get("baseline", "the baseline")
        line += (f"; against {baseline} (clean accuracy {fmt(section.get('baseline_clean_accuracy'), 'pct')}) on "
                 f"the same corrupted images: mCE {fmt(section.get('mce'), 'pct')}, relative mCE "
                 f"{fmt(section.get('relative_mce'), 'pct')} (below 100% beats the baseline)")
    params = section.get("params")
    return line + (f". Corruption parameters: {params}." if params else ".")


def caveat(result: dict[str, Any]) -> str:
    """The one-line reminder of which images the numbers hold for."""
    samples, size, seed = result.get("samples"), result.get("split_size"), result.get("seed")
    seed = seed if number(seed) else "?"
    split, data = result.get("split", "?"), result.get("data", "?")
    if number(samples) and number(size) and samples >= size:
        return f"These numbers hold for all {samples} images of the {split} split of {data}."
    of = f" of its {size}" if number(size) else ""
    count = f"{samples} images" if number(samples) else "the images"
    return (f"These numbers hold for the evaluated subset only: {count}{of} of the {split} split of {data}, "
            f"drawn with seed {seed}; another subset or seed gives somewhat different accuracies.")
