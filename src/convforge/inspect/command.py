"""``convforge filters``: per-layer filter metrics, pictures, distribution shift and the filter database."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convforge.errors import ConvforgeError

DESCRIPTION = """\
Inspect the k x k convolution filters of a checkpoint or a zoo model: per-layer metrics
(sparsity, variance entropy, orthogonality, norms; names as in torchconvquality) with
degeneration flags, PNG pictures, the distribution shift against other models (--compare),
and a filter database (--db FILE.h5) that many models can be appended to.

SOURCE is a checkpoint (.safetensors, its .json, or a run directory) or a model name from
`convforge models` (random initialisation, or --weights FILE). A --compare entry is a
checkpoint, a model name, or NAME=WEIGHTS_FILE.
"""


def add_parser(sub: Any, add_json: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("filters", help="filter metrics, pictures, distribution shift, filter database",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", metavar="CKPT|MODEL", help="checkpoint or model name")
    p.add_argument("--model", help="model name (same as giving it as SOURCE)")
    p.add_argument("--weights", help="foreign weight file for a model name (.pth/.th/.pt or .safetensors)")
    p.add_argument("--num-classes", type=int, help="classes of the model's head, for a model name (default: the registry's)")
    p.add_argument("--kernel", type=int, default=3, help="kernel size of the filters to inspect (default: 3)")
    p.add_argument("--out", help="folder for pictures and metrics.json (default: filters/MODEL_ID)")
    p.add_argument("--no-pictures", action="store_true", help="write no pictures (metrics.json only)")
    p.add_argument("--layer", action="append", default=[], metavar="NAME",
                   help="also draw this layer's filters (repeatable; default: the first and the last k x k layer)")
    p.add_argument("--compare", nargs="+", default=[], metavar="B",
                   help="other models (CKPT, MODEL or MODEL=WEIGHTS): pairwise distribution shift matrix and heat map")
    p.add_argument("--db", metavar="FILE.h5", help="append the model's filters to this filter database (created if absent)")
    p.add_argument("--summary", action="store_true", help="summarise the --db file (read in chunks)")
    p.add_argument("--model-id", help="id of the model in the database and the output (default: derived from SOURCE)")
    p.add_argument("--dataset", help="training data set recorded in the database (default: the checkpoint's data)")
    p.add_argument("--task", help="task recorded in the database (default: classification for checkpoints)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation of a model name (default: 0)")
    add_json(p)


# ---------------------------------------------------------------- loading


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


def load_source(spec: str, weights: str | None = None, num_classes: int | None = None,
                seed: int = 0) -> tuple[Any, dict[str, str]]:
    """(model, {id, source, dataset, task, architecture}) from a checkpoint path or a model name."""
    import torch

    from convforge.models import create_model, load_foreign_weights, model_info
    from convforge.train import load_checkpoint

    if weights is None and "=" in spec and not Path(spec).exists():
        spec, weights = spec.split("=", 1)
    path = Path(spec)
    if path.exists():
        if weights:
            raise ConvforgeError(f"--weights goes with a model name, not with the checkpoint {spec}")
        ckpt = load_checkpoint(path)
        name = ckpt.meta["model"]["name"]
        label = ckpt.path.parent.name if ckpt.path.parent.name not in ("", ".") else ckpt.path.stem
        data = (ckpt.meta.get("data") or {}).get("spec", "")
        return ckpt.model, {"id": f"{name}:{label}", "source": str(ckpt.path), "dataset": str(data or ""),
                            "task": "classification", "architecture": name}
    try:
        info = model_info(spec)
    except ConvforgeError as exc:
        raise ConvforgeError(f"{spec!r} is neither an existing checkpoint file or run directory nor a model name: "
                             f"{exc}") from None
    if weights and not Path(weights).is_file():
        raise ConvforgeError(f"weight file {weights} does not exist")
    with torch.random.fork_rng(devices=[]):  # a seeded init without touching the caller's random state
        torch.manual_seed(seed)
        model = create_model(spec, num_classes=num_classes or info.num_classes)
    if weights:
        load_foreign_weights(model, weights)
        return model.eval(), {"id": f"{spec}:{Path(weights).stem}", "source": str(weights), "dataset": "",
                              "task": "", "architecture": spec}
    return model.eval(), {"id": f"{spec}:random-init-seed{seed}", "source": "random initialisation", "dataset": "",
                          "task": "", "architecture": spec}


# ---------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.progress import echo

    if args.kernel < 1:
        raise ConvforgeError(f"--kernel must be >= 1, got {args.kernel}")
    if args.model:
        if args.source:
            raise ConvforgeError(f"give either SOURCE ({args.source}) or --model {args.model}, not both")
        args.source = args.model
    if args.summary and not args.db:
        raise ConvforgeError("--summary reads a filter database: give --db FILE.h5")
    if not args.source:
        if args.summary:
            return _summary(args)
        raise ConvforgeError("give a checkpoint or model name (SOURCE), or --db FILE.h5 --summary")
    if args.weights and Path(args.source).exists():
        raise ConvforgeError(f"--weights goes with a model name, not with the checkpoint {args.source}")

    from convforge.inspect.filters import extract_filters
    from convforge.inspect.metrics import (
        THRESHOLDS,
        flag_message,
        layer_metrics,
        summarize,
    )

    model, meta = load_source(args.source, args.weights, args.num_classes, args.seed)
    if args.model_id:
        meta["id"] = args.model_id
    rows = layer_metrics(model, args.kernel)
    if not rows:
        raise ConvforgeError(f"{args.source} has no 2-D convolution with a {args.kernel}x{args.kernel} kernel; "
                             f"pick another --kernel (e.g. 1, 3, 5, 7)")
    warnings = [flag_message(r["name"], flag, r) for r in rows for flag in r["flags"]]
    result: dict[str, Any] = {"model": meta["id"], "source": meta["source"], "kernel": args.kernel,
                              "thresholds": dict(THRESHOLDS), "summary": summarize(rows), "layers": rows,
                              "warnings": warnings, "pictures": []}

    filters = extract_filters(model, args.kernel)
    compare_rows: dict[str, list[dict[str, Any]]] = {meta["id"]: rows}
    if args.compare:
        from convforge.inspect.shift import shift_matrix

        groups = [(meta["id"], filters.filters)]
        for spec in args.compare:
            other, other_meta = load_source(spec, None, None, args.seed)
            name = other_meta["id"]
            while name in compare_rows:
                name += "'"
            other_rows = layer_metrics(other, args.kernel)
            if not other_rows:
                raise ConvforgeError(f"--compare {spec}: no 2-D convolution with a {args.kernel}x{args.kernel} kernel")
            compare_rows[name] = other_rows
            groups.append((name, extract_filters(other, args.kernel).filters))
        names, matrix = shift_matrix(groups, kernel=args.kernel)
        result["compare"] = {"names": names, "matrix": matrix,
                             "summaries": {n: summarize(r) for n, r in compare_rows.items()}}

    out = Path(args.out) if args.out else Path("filters") / _safe(meta["id"])
    if not args.no_pictures:
        result["pictures"] = [str(p) for p in _pictures(model, filters, compare_rows, result, out, args)]
    from convforge.fileio import atomic_write_json

    result["metrics_file"] = str(atomic_write_json(out / "metrics.json", {k: v for k, v in result.items()
                                                                            if k != "pictures"}))
    if args.db:
        from convforge.inspect.db import FilterDB

        with FilterDB(args.db, "a") as db:
            row = db.append(filters, meta["id"], source=meta["source"],
                            dataset=args.dataset if args.dataset is not None else meta["dataset"],
                            task=args.task if args.task is not None else meta["task"],
                            architecture=meta["architecture"], metrics=rows)
        result["db"] = {"path": str(args.db), "appended": row}
        if not args.json:
            echo(f"appended {row['n_filters']:,} filters of {row['n_layers']} layers as {meta['id']!r} "
                 f"to {args.db}")
    if not args.json:
        _print_layers(result)
        if "compare" in result:
            _print_matrix(result["compare"]["names"], result["compare"]["matrix"])
        for p in result["pictures"]:
            echo(f"wrote {p}")
    if args.summary:
        result["db_summary"] = _summary(args)["db_summary"]
    return result


def _pictures(model: Any, filters: Any, compare_rows: dict[str, list[dict[str, Any]]], result: dict[str, Any],
              out: Path, args: argparse.Namespace) -> list[Path]:
    import torch
    from torch import nn

    from convforge.inspect import pictures
    from convforge.inspect.filters import conv_layers, layer_weight, unwrap
    from convforge.inspect.shift import fit_pca, normalise

    written = []
    first = next((m for m in unwrap(model).modules()
                  if isinstance(m, nn.Conv2d) and m.weight.dim() == 4 and m.weight.shape[1] == 3), None)
    if first is not None:
        written.append(pictures.first_layer_rgb(layer_weight(first).numpy(), out / "first_layer_rgb.png",
                                                f"{result['model']} first layer"))
    layers = {info.name: conv for info, conv in conv_layers(model, args.kernel)}
    wanted = args.layer or list(dict.fromkeys([next(iter(layers)), list(layers)[-1]]))
    for name in wanted:
        if name not in layers:
            raise ConvforgeError(f"--layer {name!r}: no {args.kernel}x{args.kernel} convolution of that name; "
                                 f"the layers are: {', '.join(list(layers)[:12])}{' ...' if len(layers) > 12 else ''}")
        written.append(pictures.layer_grid(layer_weight(layers[name]).numpy(), out / f"layer_{_safe(name)}.png",
                                           f"{result['model']} {name}"))
    pca = fit_pca(normalise(torch.from_numpy(filters.filters)))
    written.append(pictures.eigen_filters(pca.components.numpy(), pca.explained_variance_ratio.tolist(),
                                          out / "eigen_filters.png",
                                          f"{result['model']}: principal components of its {len(filters):,} "
                                          f"normalised filters"))
    written.append(pictures.metrics_vs_depth(compare_rows, out / "metrics_vs_depth.png", result["thresholds"]))
    if "compare" in result:
        written.append(pictures.shift_heatmap(result["compare"]["names"], result["compare"]["matrix"],
                                              out / "distribution_shift.png"))
    return written


def _summary(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.inspect.db import FilterDB

    with FilterDB(args.db, "r") as db:
        summary = db.summary()
    if not args.json:
        _print_summary(summary)
    return {"db_summary": summary}


# ---------------------------------------------------------------- printing


def _console():
    import sys

    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def _print_layers(result: dict[str, Any]) -> None:
    from rich.table import Table

    t = result["thresholds"]
    table = Table(title=f"{result['model']}: {len(result['layers'])} {result['kernel']}x{result['kernel']} "
                        f"convolution(s), {result['summary']['filters']:,} filters")
    columns = ("layer", "depth", "out x in/g", "groups", "stride", "filters", "sparsity", "entropy", "ent. norm",
               "clean norm", "orthog.", "L2", "flags")
    for c in columns:
        table.add_column(c, justify="left" if c in ("layer", "flags") else "right")
    for r in result["layers"]:
        table.add_row(r["name"], f"{r['depth']:.2f}", f"{r['out_channels']}x{r['in_channels'] // r['groups']}",
                      str(r["groups"]), str(r["stride"]), f"{r['n']:,}", f"{r['sparsity']:.3f}",
                      f"{r['variance_entropy']:.3f}", f"{r['variance_entropy_norm']:.3f}",
                      f"{r['variance_entropy_clean_norm']:.3f}", f"{r['orthogonality']:.3f}", f"{r['norm_l2']:.3g}",
                      ", ".join(r["flags"]) or "-")
    console = _console()
    console.print(table)
    console.print(f"flags: sparse if sparsity >= {t['sparse']}; near_random if clean normalised entropy >= "
                  f"{t['near_random']}; collapsed if it is <= {t['collapsed']} (entropy flags need >= 16 non-sparse "
                  f"filters)", markup=False)
    for w in result["warnings"]:
        console.print(f"warning: {w}", markup=False)


def _print_matrix(names: list[str], matrix: list[list[float]]) -> None:
    from rich.table import Table

    table = Table(title="distribution shift (CNN Filter DB divergence, 0 = identical)")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for n, row in zip(names, matrix):
        table.add_row(n, *(f"{v:.4f}" for v in row))
    _console().print(table)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"{s['path']}: {s['n_filters']:,} {s['kernel']}x{s['kernel']} filters, {s['n_layers']} layers, "
                  f"{s['n_models']} model(s)", markup=False)
    if not s["n_filters"]:
        return
    table = Table(title="models")
    for c in ("id", "layers", "filters", "sparsity", "clean norm entropy", "orthogonality"):
        table.add_column(c, justify="left" if c == "id" else "right")
    for m in s["per_model"]:
        table.add_row(m["id"], str(m["layers"]), f"{m['filters']:,}", f"{m['sparsity']:.3f}",
                      f"{m['variance_entropy_clean_norm']:.3f}", f"{m['orthogonality']:.3f}")
    console.print(table)
    console.print(f"sparse share: {s['sparse_share']:.4f}", markup=False)
    console.print("PCA explained variance (normalised filters): "
                  + " ".join(f"{100 * r:.1f}%" for r in s["pca_explained_variance_ratio"]), markup=False)
    console.print("filters per depth decile: " + " ".join(f"{c:,}" for c in s["filters_per_depth_decile"]),
                  markup=False)
