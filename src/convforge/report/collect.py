"""Reading what a run directory holds, tolerantly: each part is optional and a broken file is a note, not a crash.

What is read from ``RUN``:

- ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``train.log`` and the checkpoint
  (``best.safetensors``, else ``last.safetensors``) that ``convforge train`` writes;
- ``RUN/*.json`` outputs of ``convforge bench|prune|quantize|export --json``, recognised by their
  content whatever their name (``bench.json``, ``prune.json``, ``quantize.json``, ``export.json``
  are the suggested names);
- ``RUN/*.safetensors`` other than best/last/resume: pruned checkpoints (their metadata);
- ``RUN/filters/*.png`` and ``RUN/filters/*.json`` (``convforge filters --out RUN/filters``);
- ``robust.json`` in ``RUN`` or ``RUN/robust`` (``convforge robust --out``; read by
  :mod:`convforge.report.robustness`) and ``explain.json`` in ``RUN/explain`` or ``RUN``
  (``convforge explain --out``; read by :mod:`convforge.report.explanations`), with the PNGs beside them.

Any other file is ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convforge.errors import ConfigError
from convforge.report.pictures import image_png  # noqa: F401  (the report's pictures; re-exported)

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "best.safetensors", "last.safetensors")
OWN_JSON = {"summary.json", "best.json", "last.json", "resume.json",
            "robust.json", "robust-progress.json", "explain.json"}  # the last three: their own sections
MAX_PICTURE_BYTES = 8 * 1024 * 1024
MAX_WRONG = 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class RunData:
    """Everything the report shows about one run directory (missing parts are ``None`` or empty)."""

    path: Path
    label: str
    config: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] | None = None
    checkpoint: Path | None = None
    evaluation: dict[str, Any] | None = None
    stages: list[dict[str, Any]] | None = None
    bench: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    prune: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    quantize: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    export: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    pruned_checkpoints: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    filter_pictures: list[tuple[str, bytes]] = field(default_factory=list)
    filter_tables: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ derived values

    def value(self, key: str) -> Any:
        """A summary value, else the last epoch's record value."""
        if self.summary.get(key) is not None:
            return self.summary[key]
        for record in reversed(self.records):
            if record.get(key) is not None:
                return record[key]
        return None

    @property
    def primary(self) -> str:
        """The metric that selects the best checkpoint: ``top1``, ``miou`` (segment) or ``psnr`` (super-resolve)."""
        from convforge.train.tasks import get_task, task_names

        selected = self.summary.get("best_metric") or ""
        if self.summary.get("task") in task_names():
            return get_task(self.summary["task"]).primary
        return selected.rsplit("_", 1)[-1] if "_" in selected else "top1"

    @property
    def eval_splits(self) -> list[str]:
        """The evaluated splits (or test sets) in the order the records first name them."""
        suffix = f"_{self.primary}"
        names: list[str] = []
        for record in self.records:
            for key in record:
                name = key[: -len(suffix)]
                if key.endswith(suffix) and name != "train" and name not in names:
                    names.append(name)
        return names

    @property
    def model_name(self) -> str | None:
        return self.summary.get("model") or (self.config or {}).get("model") or \
            ((self.meta or {}).get("model") or {}).get("name")

    @property
    def data_spec(self) -> str | None:
        return self.summary.get("data") or (self.config or {}).get("data") or \
            ((self.meta or {}).get("data") or {}).get("spec")

    def latency(self) -> tuple[float, str] | None:
        """Milliseconds per image and where the figure comes from.

        From a bench file: the smallest batch of the ``torch`` backend (else the first row), p50
        divided by the batch size. Otherwise ``None`` (see :meth:`training_latency`).
        """
        for name, bench in self.bench:
            rows = [r for r in bench.get("rows", []) if _number(r.get("p50_ms")) and _number(r.get("batch"))]
            if not rows:
                continue
            torch_rows = [r for r in rows if r.get("backend") == "torch"] or rows
            row = min(torch_rows, key=lambda r: r["batch"])
            return row["p50_ms"] / row["batch"], f"{name}: {row.get('backend', '?')} batch {row['batch']} p50"
        return None

    def training_latency(self) -> float | None:
        """Milliseconds per image during training (1000 / summary images_per_s): forward and backward."""
        speed = self.value("images_per_s")
        return 1000.0 / speed if _number(speed) and speed > 0 else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        notes.append(f"{path.name} could not be read ({type(exc).__name__}); left out")
        return None


def collect_run(path: str | Path, label: str | None = None, evaluate: bool = True,
                wrong: int = MAX_WRONG) -> RunData:
    """Read a run directory. ``evaluate`` loads the checkpoint and the test split to compute the
    confusion matrix, per-class accuracy, most confidently wrong images and per-stage complexity."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; give a run directory (the --out of convforge train)")
    if not any((path / name).exists() for name in RUN_FILES):
        raise ConfigError(f"{path} is not a convforge run directory: it has none of {', '.join(RUN_FILES)}")
    run = RunData(path=path, label=label or path.name)
    _read_config(run)
    _read_metrics(run)
    summary = _read_json(path / "summary.json", run.notes) if (path / "summary.json").is_file() else None
    run.summary = summary if isinstance(summary, dict) else {}
    if run.summary.get("status") == "diverged":
        run.notes.append(f"the run diverged: {run.summary.get('error', '')}")
    elif not run.summary:
        run.notes.append("no summary.json: the run is unfinished or was interrupted")
    _read_checkpoint_meta(run)
    _read_extras(run)
    _read_filters(run)
    if evaluate and run.checkpoint is not None:
        _evaluate(run, wrong)
    return run


def _read_config(run: RunData) -> None:
    file = run.path / "config.yaml"
    if not file.is_file():
        return
    try:
        import yaml

        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any YAML or decoding problem is a note
        run.notes.append(f"config.yaml could not be read ({type(exc).__name__}); left out")
        return
    if isinstance(loaded, dict):
        run.config = loaded


def _read_metrics(run: RunData) -> None:
    file = run.path / "metrics.jsonl"
    if not file.is_file():
        return
    bad = 0
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        run.notes.append("metrics.jsonl could not be read; no learning curves")
        return
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and _number(record.get("epoch")):
            run.records.append(record)
        else:
            bad += 1
    if bad:
        run.notes.append(f"{bad} line(s) of metrics.jsonl were not epoch records; skipped")


def _read_checkpoint_meta(run: RunData) -> None:
    from convforge.train.checkpoint import read_checkpoint_meta

    for name in ("best.safetensors", "last.safetensors"):
        file = run.path / name
        if file.is_file():
            try:
                run.meta = read_checkpoint_meta(file)
                run.checkpoint = file
                return
            except Exception as exc:  # noqa: BLE001 - a broken checkpoint must not stop the report
                run.notes.append(f"{name} could not be read: {str(exc)[:300]}")


def classify(obj: Any) -> str | None:
    """Which convforge command wrote this JSON object: bench, prune, quantize, export, or None."""
    if not isinstance(obj, dict):
        return None
    rows = obj.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) and "backend" in r and "batch" in r for r in rows):
        return "bench"
    if "method" in obj and "macs_before" in obj and "macs_after" in obj:
        return "prune"
    if "top1_int8" in obj or "top1_fp32" in obj:
        return "quantize"
    if "max_abs_diff" in obj and "onnx" in obj:
        return "export"
    return None


def _read_extras(run: RunData) -> None:
    for file in sorted(run.path.glob("*.json")):
        if file.name in OWN_JSON or file.with_suffix(".safetensors").exists() or file.with_suffix(".onnx").exists():
            continue  # checkpoint and ONNX sidecars
        obj = _read_json(file, run.notes)
        kind = classify(obj)
        if kind is not None:
            getattr(run, kind).append((file.name, obj))
    from convforge.train.checkpoint import read_checkpoint_meta

    for file in sorted(run.path.glob("*.safetensors")):
        if file.name in ("best.safetensors", "last.safetensors", "resume.safetensors"):
            continue
        try:
            meta = read_checkpoint_meta(file)
        except Exception:  # noqa: BLE001 - not a convforge checkpoint: ignored
            continue
        if isinstance(meta.get("compress"), dict) or isinstance(meta.get("sparsity"), dict):
            run.pruned_checkpoints.append((file.name, meta))


def _read_filters(run: RunData) -> None:
    folder = run.path / "filters"
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.png")):
        try:
            if file.stat().st_size > MAX_PICTURE_BYTES:
                run.notes.append(f"filters/{file.name} is larger than {MAX_PICTURE_BYTES >> 20} MiB; left out")
                continue
            data = file.read_bytes()
        except OSError:
            continue
        if data.startswith(PNG_SIGNATURE):
            run.filter_pictures.append((file.name, data))
    for file in sorted(folder.glob("*.json")):
        obj = _read_json(file, run.notes)
        rows = table_rows(obj)
        if isinstance(obj, dict) and isinstance(obj.get("warnings"), list):
            run.notes += [f"filters/{file.name}: {w}" for w in obj["warnings"][:20] if isinstance(w, str)]
        if rows:
            run.filter_tables.append((file.name, rows))


def table_rows(obj: Any) -> list[dict[str, Any]]:
    """Rows of scalars from a JSON object: a list of dicts, a dict with a list of dicts (e.g. under
    ``layers``), or a dict of dicts (name -> values). Empty when nothing fits."""
    def scalars(item: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in item.items():
            if isinstance(v, (str, int, float, bool)) or v is None:
                out[k] = v
            elif isinstance(v, list) and all(isinstance(x, str) for x in v):
                out[k] = ", ".join(v)  # e.g. a layer's flags
        return out

    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return [scalars(r) for r in obj]
    if isinstance(obj, dict):
        for key in ("layers", "rows", "metrics", "results"):
            if isinstance(obj.get(key), (list, dict)):
                rows = table_rows(obj[key])
                if rows:
                    return rows
        if obj and all(isinstance(v, dict) for v in obj.values()):
            return [{"name": k, **scalars(v)} for k, v in obj.items()]
    return []


# ---------------------------------------------------------------- evaluation and model summary


def _evaluate(run: RunData, wrong: int) -> None:
    import torch

    from convforge.train.inference import load_model

    try:
        loaded = load_model(run.checkpoint)
    except Exception as exc:  # noqa: BLE001
        run.notes.append(f"the checkpoint could not be loaded ({str(exc)[:300]}); no evaluation")
        return
    torch.manual_seed(0)
    try:
        run.stages = stage_summary(loaded.model, tuple(loaded.input_size))
    except Exception as exc:  # noqa: BLE001 - MAC counting can fail on exotic operators
        run.notes.append(f"per-stage summary failed ({type(exc).__name__}: {str(exc)[:200]})")
    spec = loaded.data_spec or run.data_spec
    if not spec:
        run.notes.append("the checkpoint names no data set; no evaluation")
        return
    try:
        if loaded.task != "classify":
            from convforge.report.dense import evaluate_dense_checkpoint

            run.evaluation = evaluate_dense_checkpoint(loaded, spec)
        else:
            run.evaluation = evaluate_checkpoint(loaded, spec, (run.config or {}).get("image_size"), wrong)
    except Exception as exc:  # noqa: BLE001 - e.g. the data set has moved since training
        run.notes.append(f"evaluation on {spec} failed: {str(exc)[:300]}")


def stage_summary(model: Any, input_size: tuple[int, ...]) -> list[dict[str, Any]]:
    """Params and MACs per top-level child module, a ``stages``/``features``/``blocks`` container split
    into its children; MACs from one pass of ``torch.utils.flop_counter``."""
    from convforge.measure.complexity import macs_by_module

    macs = macs_by_module(model, input_size)
    root = type(model).__name__
    rows = []
    for name, child in model.named_children():
        parts = [(name, child)]
        if name in ("stages", "features", "blocks", "layers") and len(list(child.children())) > 1:
            parts = [(f"{name}.{n}", c) for n, c in child.named_children()]
        for part_name, module in parts:
            rows.append({"name": part_name, "type": type(module).__name__,
                         "params": sum(p.numel() for p in module.parameters()),
                         "macs": _module_macs(macs, f"{root}.{part_name}", module)})
    total_params = sum(p.numel() for p in model.parameters())
    total_macs = macs.get("Global", 0)
    for row in rows:
        row["params_share"] = row["params"] / total_params if total_params else 0.0
        row["macs_share"] = row["macs"] / total_macs if total_macs else 0.0
    rows.append({"name": "total", "type": root, "params": total_params, "macs": total_macs,
                 "params_share": 1.0, "macs_share": 1.0})
    return rows


def _module_macs(macs: dict[str, int], name: str, module: Any) -> int:
    """MACs of ``module``: the counter's figure, or, for a container whose children the parent calls directly
    (so the counter never entered it), the sum over its children."""
    if macs.get(name):
        return macs[name]
    return sum(_module_macs(macs, f"{name}.{child_name}", child) for child_name, child in module.named_children())


def evaluate_checkpoint(ckpt: Any, spec: str, image_size: Any, wrong: int) -> dict[str, Any]:
    """Confusion matrix, per-class accuracy and the ``wrong`` most confidently wrong test images of a
    LoadedModel (or Checkpoint), through :mod:`convforge.train.inference`: the images ``convforge eval``
    scores (for a model trained on image stores, the evaluation views its checkpoint's ``preprocess`` records)."""
    import torch

    from convforge.train.inference import as_loaded, class_probabilities, eval_views, load_eval_data

    loaded = as_loaded(ckpt)
    data = load_eval_data(loaded, spec, image_size)
    notes: list[str] = list(data.notes)
    split_name = "test"
    classes = loaded.classes
    n = len(classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    kept: list[tuple[float, int, Any, Any]] = []  # (confidence, index, image, probabilities) of the worst so far
    wrong_total = count = 0
    for images, labels in eval_views(loaded, data, split_name, notes):
        probs = class_probabilities(loaded, images)
        labels = labels.long()
        confidence, pred = probs.max(dim=1)
        confusion += torch.bincount(labels * n + pred, minlength=n * n).view(n, n)
        for i in (pred != labels).nonzero().flatten().tolist():
            kept.append((float(confidence[i]), count + i, images[i].clone(), (int(labels[i]), int(pred[i]),
                                                                             float(probs[i, labels[i]]))))
        wrong_total += int((pred != labels).sum())
        count += len(labels)
        kept = sorted(kept, key=lambda item: (-item[0], item[1]))[:wrong]
    totals = confusion.sum(dim=1)
    per_class = [100.0 * int(confusion[i, i]) / int(totals[i]) if totals[i] else None for i in range(n)]
    mistakes = [{"index": index, "true": classes[true], "pred": classes[pred], "confidence": conf,
                 "true_prob": true_prob, "png": image_png(image)}
                for conf, index, image, (true, pred, true_prob) in kept]
    return {"split": split_name, "data": spec, "images": count, "classes": classes,
            "top1": 100.0 * int(confusion.diag().sum()) / max(count, 1),
            "per_class": per_class, "confusion": confusion.tolist(), "wrong": mistakes,
            "wrong_total": wrong_total, "notes": notes}
