"""The report page: one self-contained HTML file (inline CSS, images as data: URIs, no script, no network)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from convforge.report import plots
from convforge.report.collect import RunData
from convforge.report.explanations import explanations_section
from convforge.report.robustness import robustness_section
from convforge.report.markup import CSS, breakable, esc, fmt, img, notes, png_size, slug, table  # noqa: F401

# ---------------------------------------------------------------- sections of one run


PRIMARY = {"top1": ("top-1", "pct"), "miou": ("mIoU", "pct"), "psnr": ("PSNR (dB)", "")}


def facts(run: RunData) -> str:
    if run.primary == "top1":
        headline = [(fmt(run.value("test_top1"), "pct"), "test top-1"), (fmt(run.value("test_top5"), "pct"), "test top-5")]
    else:
        name, kind = PRIMARY.get(run.primary, (run.primary, ""))
        headline = [(fmt(run.value(f"{split}_{run.primary}"), kind), f"{split} {name}") for split in run.eval_splits[:3]]
    best = run.summary.get("best_score", run.summary.get("best_top1"))
    items = [
        *headline,
        (f"{fmt(best, PRIMARY.get(run.primary, ('', ''))[1])} (epoch {run.summary.get('best_epoch', '-')})"
         if best is not None else "-", f"best ({run.summary.get('best_metric', run.summary.get('best_selected_on', 'test'))})"),
        (fmt(run.value("params"), "mega"), "parameters"),
        (fmt(run.value("macs"), "mega"), "MACs per image"),
        (f"{fmt(run.value('images_per_s'), 'speed')} img/s" if run.value("images_per_s") else "-", "training speed"),
        (f"{run.summary['wall_time_s']:.1f} s" if isinstance(run.summary.get("wall_time_s"), (int, float)) else "-",
         "wall time"),
        (esc(run.summary.get("status", "unfinished")), "status"),
    ]
    return '<div class="facts">' + "".join(f'<div class="fact"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                                          for v, k in items) + "</div>"


def environment(run: RunData) -> str:
    meta = run.meta or {}
    rows = [("model", run.model_name), ("model arguments", (meta.get("model") or {}).get("args") or
                                         (run.config or {}).get("model_args")),
            ("data", run.data_spec),
            ("images", ", ".join(f"{k} {v}" for k, v in (meta.get("data") or {}).items() if k != "spec") or None),
            ("input", "x".join(map(str, meta["input_size"])) if isinstance(meta.get("input_size"), list) else None),
            ("classes", len(meta["classes"]) if isinstance(meta.get("classes"), list) else None),
            ("device", run.summary.get("device") or (run.config or {}).get("device")),
            ("threads", run.summary.get("threads")), ("torch", run.summary.get("torch")),
            ("python", run.summary.get("python")), ("convforge", meta.get("convforge_version")),
            ("checkpoint", f"{run.checkpoint.name} (epoch {meta.get('epoch', '?')}, {meta.get('weights', 'trained')} "
                           f"weights, saved {meta.get('created', '?')})" if run.checkpoint else None),
            ("started from", _init_text(meta.get("init"))),
            ("run directory", str(run.path))]
    env = table(("", ""), [(k, "-" if v in (None, "", {}) else v) for k, v in rows])
    config = ""
    if run.config:
        config = ("<details><summary>training configuration (config.yaml)</summary>"
                  + table(("option", "value"), [(k, "-" if v is None else v) for k, v in run.config.items()])
                  + "</details>")
    return f'<div class="grid"><div>{env}</div></div>{config}'


def _init_text(init: Any) -> str | None:
    """Where a run's weights started (``--init``), or None for a run from scratch."""
    if not isinstance(init, dict) or not init.get("checkpoint"):
        return None
    source = "foreign weight file " if init.get("foreign") else ""
    scores = {k: v for k, v in (init.get("metrics") or {}).items()
              if isinstance(v, (int, float)) and k.endswith(("_top1", "_miou", "_psnr"))}
    shown = ", ".join(f"{k} {v:.2f}" for k, v in list(scores.items())[:3])
    return (f"{source}{init['checkpoint']} ({init.get('model', '?')}"
            + (f", epoch {init['epoch']}" if init.get("epoch") is not None else "")
            + (f"; {shown}" if shown else "") + f"; head {init.get('head', '?')})")


def curves_section(run: RunData) -> str:
    picture = plots.learning_curves([(run.label, run.records)], run.primary)
    if picture is None:
        return ""
    if run.primary == "top1":
        rows = [(r.get("epoch"), fmt(r.get("train_loss")), fmt(r.get("train_top1"), "pct"),
                 fmt(r.get("val_top1"), "pct") if "val_top1" in r else "-", fmt(r.get("test_loss")),
                 fmt(r.get("test_top1"), "pct"), fmt(r.get("lr")), fmt(r.get("images_per_s"), "speed"))
                for r in run.records]
        header = ("epoch", "train loss", "train top-1", "val top-1", "test loss", "test top-1", "lr", "img/s")
    else:
        name, kind = PRIMARY.get(run.primary, (run.primary, ""))
        splits = run.eval_splits
        rows = [(r.get("epoch"), fmt(r.get("train_loss")), *(fmt(r.get(f"{s}_{run.primary}"), kind) for s in splits),
                 fmt(r.get("lr")), fmt(r.get("images_per_s"), "speed")) for r in run.records]
        header = ("epoch", "train loss", *(f"{s} {name}" for s in splits), "lr", "img/s")
    epochs = ("<details><summary>per-epoch metrics (metrics.jsonl)</summary>"
              + table(header, rows, numeric=range(len(header))) + "</details>")
    return "<h3>Learning curves</h3>" + img(picture, f"learning curves of {run.label}") + epochs


REPORT_SECTIONS: dict[str, Callable[[RunData], str]] = {}


def register_report_section(task: str, section: Callable[[RunData], str]) -> None:
    """Make ``section(run) -> HTML`` the evaluation section of runs of ``task`` (a task name)."""
    REPORT_SECTIONS[task] = section


def _dense_section(run: RunData) -> str:
    from convforge.report.dense import dense_section

    return dense_section(run)


register_report_section("segment", _dense_section)
register_report_section("super-resolve", _dense_section)


def run_task(run: RunData) -> str:
    """The task a run trained: from summary.json, else the checkpoint, else classification."""
    return str(run.summary.get("task") or (run.meta or {}).get("task") or "classify")


def _task_section(name: str) -> Callable[[RunData], str] | None:
    """A report section the task itself provides (``Task.report_section``), else a registered one."""
    from convforge.train.tasks import get_task, task_names

    own = getattr(get_task(name), "report_section", None) if name in task_names() else None
    return own or REPORT_SECTIONS.get(name)


def evaluation_section(run: RunData) -> str:
    """Classification: confusion matrix, per-class accuracy and wrong images; another task: its own
    section when it has one, else a table of the last epoch's metrics per evaluated split."""
    task, ev = run_task(run), run.evaluation
    if task != "classify":
        section = _task_section(task)
        if section is not None and ev:
            return section(run)
        return metrics_section(run)
    if not ev:
        return ""
    return classify_section(run, ev)


def metrics_section(run: RunData) -> str:
    """The last epoch's metrics of each evaluated split (from metrics.jsonl), primary metric first."""
    final = run.records[-1] if run.records else {}
    splits = run.eval_splits
    if not splits:
        return ""
    names: list[str] = [run.primary]
    for split in splits:
        names += [k[len(split) + 1:] for k, v in final.items() if k.startswith(f"{split}_") and _plain_number(v)
                  and k[len(split) + 1:] not in names]
    label, kind = PRIMARY.get(run.primary, (run.primary, ""))
    headers = ("split", *(label if n == run.primary else n for n in names))
    rows = [(split, *(fmt(final.get(f"{split}_{n}"), kind if n == run.primary else "") for n in names))
            for split in splits]
    return (f"<h3>Evaluation: {esc(label)} and other metrics per split</h3>"
            f'<p class="sub">Epoch {esc(final.get("epoch", "?"))} of metrics.jsonl; {esc(label)} selects the best '
            "checkpoint.</p>" + table(headers, rows, numeric=range(1, len(headers))))


def _plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def classify_section(run: RunData, ev: dict[str, Any]) -> str:
    """Confusion matrix, per-class accuracy and the most confidently wrong test images."""
    classes = ev["classes"]
    out = [f"<h3>Test set: confusion matrix and per-class accuracy</h3>"
           f'<p class="sub">{esc(run.checkpoint.name if run.checkpoint else "")} evaluated on the {esc(ev["split"])} '
           f'split of {esc(ev["data"])}: {ev["images"]:,} images, top-1 {ev["top1"]:.2f}%.</p>', notes(ev["notes"])]
    confusion = ev["confusion"]
    per_class_rows = []
    for i, name in enumerate(classes):
        acc = ev["per_class"][i]
        row = confusion[i]
        off = [(count, j) for j, count in enumerate(row) if j != i and count]
        confused = f"{classes[max(off)[1]]} ({max(off)[0]})" if off else "-"
        bar = ("html", f'<span class="bar" style="width:{0 if acc is None else acc * 0.6:.1f}px"></span>'
                       f"{'-' if acc is None else f'{acc:.1f}%'}")
        per_class_rows.append((name, bar, f"{sum(row):,}", confused))
    per_class = table(("class", "accuracy", "images", "most often taken for"), per_class_rows, numeric=(2,))
    if len(classes) > 30:
        per_class = f"<details><summary>per-class accuracy ({len(classes)} classes)</summary>{per_class}</details>"
    out.append(f'<div class="grid"><div>{img(plots.confusion_matrix(confusion, classes), "confusion matrix")}'
               f"</div><div>{per_class}</div></div>")
    if ev["wrong"]:
        shown, total = len(ev["wrong"]), ev["wrong_total"]
        which = (f"All {total} mistake{'s' if total > 1 else ''}" if shown == total
                 else f"The {shown} most confident of the {total:,} mistakes")
        out.append(f"<h3>Most confidently wrong test images</h3>"
                   f'<p class="sub">{which}, most confident first: the predicted class and its probability, then the '
                   f"true class and the probability the model gave it.</p>")
        cards = []
        for item in ev["wrong"]:
            caption = (f'<b class="bad">{esc(item["pred"])}</b> {100 * item["confidence"]:.1f}%<br>'
                       f'true: <span class="ok">{esc(item["true"])}</span> {100 * item["true_prob"]:.1f}%<br>'
                       f'<span class="sub">#{item["index"]}</span>')
            alt = f"test image {item['index']}: true {item['true']}, predicted {item['pred']}"
            tag = img(item["png"], alt)[len("<figure>"):-len("</figure>")]
            cards.append(f"<figure>{tag}<figcaption>{caption}</figcaption></figure>")
        out.append(f'<div class="wrong">{"".join(cards)}</div>')
    elif ev["images"]:
        out.append('<p class="sub">The model classified every test image correctly.</p>')
    return "".join(out)


def model_section(run: RunData) -> str:
    if not run.stages:
        return ""
    rows, classes = [], []
    for r in run.stages:
        rows.append((r["name"], r["type"], fmt(r["params"], "count"), f"{100 * r['params_share']:.1f}%",
                     fmt(r["macs"], "count"), f"{100 * r['macs_share']:.1f}%"))
        classes.append("best" if r["name"] == "total" else "")
    return ("<h3>Model summary</h3><p class=\"sub\">Parameters and multiply-accumulates per image by top-level "
            "module (stage containers split into their stages); MACs counted by torch.utils.flop_counter at the "
            "checkpoint's input size.</p>"
            + table(("module", "type", "params", "share", "MACs", "share"), rows, numeric=(2, 3, 4, 5),
                    row_classes=classes))


def bench_section(run: RunData) -> str:
    if not run.bench:
        return ""
    out = ["<h3>Benchmarks (convforge bench)</h3>"]
    for name, bench in run.bench:
        size = bench.get("input_size")
        out.append(f'<p class="sub">{esc(name)}: {esc(bench.get("target", ""))} '
                   f"{fmt(bench.get('params'), 'mega')} params, {fmt(bench.get('macs'), 'mega')} MACs, input "
                   f"{esc('x'.join(map(str, size)) if isinstance(size, list) else '-')}, "
                   f"{esc(bench.get('threads', '-'))} threads, torch {esc(bench.get('torch', '-'))}</p>")
        rows = [(r.get("backend"), r.get("batch"), fmt(r.get("p50_ms"), "ms"), fmt(r.get("p90_ms"), "ms"),
                 fmt(r.get("images_per_s"), "speed")) for r in bench.get("rows", [])]
        out.append(table(("backend", "batch", "latency p50", "latency p90", "images/s"), rows, numeric=(1, 2, 3, 4)))
        out.append(notes(n for n in bench.get("notes", []) if isinstance(n, str)))
    return "".join(out)


def _checkpoint_name(target: Any) -> str:
    """The checkpoint file a bench/prune target names: a run directory means its best.safetensors."""
    path = Path(str(target))
    if path.is_dir() or not path.suffix:
        return "best.safetensors"
    return path.with_suffix(".safetensors").name if path.suffix == ".json" else path.name


def _bench_latency(run: RunData, target: str | None) -> str:
    """Smallest-batch torch p50 of a bench file whose target is the checkpoint ``target``."""
    if not target:
        return "-"
    for _, bench in run.bench:
        if bench.get("target") and _checkpoint_name(bench["target"]) == _checkpoint_name(target) and bench.get("rows"):
            rows = [r for r in bench["rows"] if r.get("backend") == "torch"] or bench["rows"]
            row = min(rows, key=lambda r: r.get("batch", 1 << 30))
            per_image = row["p50_ms"] / row["batch"] if _num(row.get("p50_ms")) and _num(row.get("batch")) else None
            return f"{fmt(per_image, 'ms')} per image (batch {row.get('batch')})"
    return "-"


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _file_size(run: RunData, path: Any) -> Any:
    if not path:
        return None
    for candidate in (Path(str(path)), run.path / Path(str(path)).name):
        if candidate.is_file():
            return candidate.stat().st_size
    return None


def compression_section(run: RunData) -> str:
    rows: list[tuple[Any, ...]] = []
    seen_outputs = set()
    for name, rep in run.prune:
        source, output = rep.get("checkpoint"), rep.get("output")
        seen_outputs.add(Path(str(output)).name if output else None)
        what = f"{rep.get('method')} " + (f"target MACs {rep['target_macs']}" if rep.get("target_macs") is not None
                                           else f"sparsity {rep.get('sparsity_target')}")
        rows.append((f"unpruned ({name})", fmt(rep.get("top1_before"), "pct"), fmt(rep.get("params_before"), "count"),
                     fmt(rep.get("macs_before"), "mega"), fmt(_file_size(run, source), "bytes"),
                     _bench_latency(run, source)))
        rows.append((f"pruned: {what}", fmt(rep.get("top1_after"), "pct"), fmt(rep.get("params_after"), "count"),
                     fmt(rep.get("macs_after"), "mega"), fmt(_file_size(run, output), "bytes"),
                     _bench_latency(run, output)))
    for name, meta in run.pruned_checkpoints:
        if name in seen_outputs:
            continue
        comp = meta.get("compress") or {}
        metrics = meta.get("metrics") or {}
        top1 = next((v for k, v in metrics.items() if k.endswith("top1")), None)
        rows.append((f"pruned checkpoint {name} ({comp.get('method', (meta.get('sparsity') or {}).get('method', ''))})",
                     fmt(top1, "pct"), fmt(comp.get("params_after"), "count"), fmt(comp.get("macs_after"), "mega"),
                     fmt(_file_size(run, name), "bytes"), _bench_latency(run, name)))
    for name, rep in run.quantize:
        speed = rep.get("images_per_s_batch256") or {}
        for label, top1, size, key in (("PyTorch fp32", rep.get("top1_torch"), None, "torch eager fp32"),
                                       ("ONNX Runtime fp32", rep.get("top1_fp32"), rep.get("fp32_bytes"), "onnxruntime fp32"),
                                       ("ONNX Runtime int8", rep.get("top1_int8"), rep.get("bytes"), "onnxruntime int8")):
            if top1 is None and size is None and key not in speed:
                continue
            per_image = 1000.0 / speed[key] if isinstance(speed.get(key), (int, float)) and speed[key] > 0 else None
            rows.append((f"{label} ({name})", fmt(top1, "pct"), "-", "-", fmt(size, "bytes"),
                         f"{fmt(per_image, 'ms')} per image (batch 256)" if per_image else "-"))
    for name, rep in run.export:
        rows.append((f"ONNX export ({name}), max |diff| {fmt(rep.get('max_abs_diff'))}", "-", "-", "-",
                     fmt(rep.get("bytes"), "bytes"), "-"))
    if not rows:
        return ""
    return ("<h3>Compression</h3><p class=\"sub\">From the JSON of convforge prune, quantize and export in the run "
            "directory, and pruned checkpoints found there; latency from a bench file of the same checkpoint "
            "where there is one.</p>"
            + table(("variant", "top-1", "params", "MACs", "size", "latency"), rows, numeric=(1, 2, 3, 4)))


DEPTH_KEYS = ("normalized_depth", "normalised_depth", "depth_norm", "norm_depth", "relative_depth", "depth")


def filters_section(run: RunData) -> str:
    if not run.filter_pictures and not run.filter_tables:
        return ""
    out = ["<h3>Filters</h3>"]
    if run.filter_pictures:
        figures = []
        for name, data in run.filter_pictures:
            wide = png_size(data)[0] > 700
            figures.append(img(data, name, name).replace("<figure>", '<figure class="wide">' if wide else "<figure>", 1))
        out.append(f'<div class="pics">{"".join(figures)}</div>')
    for name, rows in run.filter_tables:
        columns: list[str] = []
        for r in rows[:50]:
            columns += [k for k in r if k not in columns]
        columns = columns[:12]
        depth = next((k for k in DEPTH_KEYS if k in columns), None)
        if depth and not any("depth" in picture for picture, _ in run.filter_pictures):
            metrics = [c for c in columns if c != depth and any(
                isinstance(r.get(c), float) and not isinstance(r.get(c), bool) for r in rows)]
            out.append(img(plots.depth_curves(rows, depth, metrics, name), f"{name}: metrics against depth"))
        numeric = [i for i, c in enumerate(columns) if all(isinstance(r.get(c), (int, float, type(None))) for r in rows)]
        body = table(columns, [[fmt(r.get(c)) for c in columns] for r in rows[:300]], numeric=numeric)
        more = f" (first 300 of {len(rows)})" if len(rows) > 300 else ""
        out.append(f"<details><summary>{esc(name)}: {len(rows)} rows{more}</summary>{body}</details>")
    return "".join(out)


def run_sections(run: RunData, heading: bool) -> str:
    parts = [notes(run.notes), facts(run), curves_section(run), evaluation_section(run), robustness_section(run.path),
             explanations_section(run.path), model_section(run), bench_section(run), compression_section(run),
             filters_section(run),
             "<h3>Configuration and environment</h3>" + environment(run)]
    body = "".join(p for p in parts if p)
    if heading:
        return f'<section class="run" id="run-{slug(run.label)}"><h2>{esc(run.label)}</h2>{body}</section>'
    return f"<section>{body}</section>"


# ---------------------------------------------------------------- comparison of several runs


def latency_points(runs: list[RunData]) -> tuple[list[float | None], str]:
    """Per run ms per image, and the axis label saying where it comes from: bench files when every
    run has one, else the training throughput of summary.json for every run (so that all compare alike)."""
    bench = [run.latency() for run in runs]
    if all(b is not None for b in bench):
        return [b[0] for b in bench], "inference latency, ms per image (convforge bench: torch, smallest batch, p50)"
    return [run.training_latency() for run in runs], \
        "training time, ms per image (1000 / images_per_s of summary.json; forward + backward, no bench file)"


def comparison_section(runs: list[RunData]) -> str:
    latencies, source = latency_points(runs)
    rows = []
    for run, latency in zip(runs, latencies):
        rows.append((("html", f'<a href="#run-{slug(run.label)}">{esc(run.label)}</a>'), run.model_name or "-",
                     run.data_spec or "-", run.value("epochs") or (run.records[-1]["epoch"] if run.records else "-"),
                     fmt(run.value("params"), "mega"), fmt(run.value("macs"), "mega"),
                     fmt(run.value("test_top1"), "pct"), fmt(run.summary.get("best_top1"), "pct"),
                     fmt(run.value("images_per_s"), "speed"), fmt(latency, "ms")))
    accuracies = [run.value("test_top1") for run in runs]
    out = ["<h2 id=\"comparison\">Comparison</h2>",
           table(("run", "model", "data", "epochs", "params", "MACs", "test top-1", "best top-1", "train img/s",
                  "latency / image"), rows, numeric=range(3, 10)),
           f'<p class="sub">Latency: {esc(source)}.</p>']
    curves = plots.learning_curves([(run.label, run.records) for run in runs])
    if curves:
        out.append("<h3>Learning curves, overlaid</h3>" + img(curves, "learning curves of all runs",
                                                             "colour per run; train solid, val dotted, test dashed"))
    keep = [i for i, (a, t) in enumerate(zip(accuracies, latencies))
            if isinstance(a, (int, float)) and isinstance(t, (int, float)) and math.isfinite(a) and math.isfinite(t)]
    if keep:
        front = [keep[i] for i in plots.pareto_front([(latencies[i], accuracies[i]) for i in keep])]
        picture = plots.accuracy_latency([runs[i].label for i in keep], [latencies[i] for i in keep],
                                         [accuracies[i] for i in keep], source.split(" (")[0])
        out.append("<h3>Accuracy against latency</h3>" + img(
            picture, "accuracy against latency with the Pareto front",
            "Pareto front (red): runs that no other run beats on both accuracy and latency: "
            + ", ".join(runs[i].label for i in front)))
    return "".join(out)


def render(runs: list[RunData]) -> str:
    from convforge.version import __version__

    several = len(runs) > 1
    title = "convforge report: " + (runs[0].label if not several else f"{len(runs)} runs")
    nav = ""
    if several:
        nav = "<nav>" + '<a href="#comparison">comparison</a>' + "".join(
            f'<a href="#run-{slug(r.label)}">{esc(r.label)}</a>' for r in runs) + "</nav>"
    subtitle = (f"{esc(runs[0].model_name or '?')} on {esc(runs[0].data_spec or '?')}" if not several
                else ", ".join(esc(r.label) for r in runs))
    body = (comparison_section(runs) if several else "") + "".join(run_sections(r, several) for r in runs)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<link rel=\"icon\" href=\"data:,\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{esc(title)}</h1><p class=\"sub\">{subtitle}</p>{nav}</header>{body}"
        f"<footer>Written by convforge {esc(__version__)} on {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}. "
        "Self-contained: pictures are embedded, the page loads nothing from the network.</footer>"
        "</main></body></html>\n"
    )
