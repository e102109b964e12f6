"""``convforge filters``: per-layer filter metrics, pictures, distribution shift and the filter database."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convforge.errors import ConvforgeError

DESCRIPTION = """\
Inspect the k x k convolution filters of a checkpoint or a zoo model: per-layer metrics
(sparsity, variance entropy, orthogonality, norms; names as in torchconvquality) with
degeneration flags, PNG pictures, the distribution shift against other models (--compare),
and a filter database (--db FILE.h5) that many models can be appended to.

SOURCE is a checkpoint (.safetensors, its .json, or a run directory), a model name from
`convforge models` (random initialisation), --model NAME --weights FILE, or NAME=WEIGHTS_FILE.
A --compare entry is a checkpoint, a model name, or NAME=WEIGHTS_FILE.
"""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


def describe(loaded: Any, seed: int = 0) -> dict[str, str]:
    """{id, source, dataset, task, architecture} of a LoadedModel, as the filter database records them."""
    name = loaded.name
    if loaded.path is not None:
        path = loaded.path
        label = path.parent.name if path.parent.name not in ("", ".") else path.stem
        return {"id": f"{name}:{label}", "source": str(path), "dataset": str(loaded.data_spec or ""),
                "task": "classification", "architecture": name}
    if loaded.weights:
        return {"id": f"{name}:{Path(loaded.weights).stem}", "source": loaded.weights, "dataset": "", "task": "",
                "architecture": name}
    return {"id": f"{name}:random-init-seed{seed}", "source": "random initialisation", "dataset": "", "task": "",
            "architecture": name}


def load_source(spec: str, weights: str | None = None, num_classes: int | None = None,
                seed: int = 0) -> tuple[Any, dict[str, str]]:
    """(model, {id, source, dataset, task, architecture}) from a checkpoint, a model name or NAME=WEIGHTS."""
    from convforge.train.inference import is_checkpoint_path, load_model

    if weights is None and "=" in spec and not Path(spec).exists():
        spec, weights = spec.split("=", 1)
    if is_checkpoint_path(spec) and Path(spec).exists():
        if weights:
            raise ConvforgeError(f"--weights goes with a model name, not with the checkpoint {spec}")
        loaded = load_model(spec)
    else:
        if weights and not Path(weights).is_file():
            raise ConvforgeError(f"weight file {weights} does not exist")
        try:
            loaded = load_model(model=spec, weights=weights, num_classes=num_classes, seed=seed)
        except ConvforgeError as exc:
            raise ConvforgeError(f"{spec!r} is neither an existing checkpoint file or run directory nor a model "
                                 f"name: {exc}") from None
    return loaded.model, describe(loaded, seed)


# ---------------------------------------------------------------- the command


def inspect_filters(model: Any, meta: dict[str, str], *, kernel: int = 3, out: str | Path | None = None,
                    pictures: bool = True, layers: Sequence[str] = (), compare: Sequence[str] = (),
                    db: str | None = None, summary: bool = False, dataset: str | None = None,
                    task: str | None = None, seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """What ``convforge filters`` does for one model (``meta`` from :func:`describe`): metrics, pictures in
    ``out``, the shift against ``compare`` sources, and an append to the filter database ``db``."""
    from convforge.progress import echo

    if kernel < 1:
        raise ConvforgeError(f"--kernel must be >= 1, got {kernel}")
    from convforge.inspect.filters import extract_filters
    from convforge.inspect.metrics import (
        THRESHOLDS,
        flag_message,
        layer_metrics,
        summarize,
    )

    rows = layer_metrics(model, kernel)
    if not rows:
        raise ConvforgeError(f"{meta['id']} has no 2-D convolution with a {kernel}x{kernel} kernel; "
                             f"pick another --kernel (e.g. 1, 3, 5, 7)")
    warnings = [flag_message(r["name"], flag, r) for r in rows for flag in r["flags"]]
    result: dict[str, Any] = {"model": meta["id"], "source": meta["source"], "kernel": kernel,
                              "thresholds": dict(THRESHOLDS), "summary": summarize(rows), "layers": rows,
                              "warnings": warnings, "pictures": []}

    filters = extract_filters(model, kernel)
    compare_rows: dict[str, list[dict[str, Any]]] = {meta["id"]: rows}
    if compare:
        from convforge.inspect.shift import shift_matrix

        groups = [(meta["id"], filters.filters)]
        for spec in compare:
            other, other_meta = load_source(spec, None, None, seed)
            name = other_meta["id"]
            while name in compare_rows:
                name += "'"
            other_rows = layer_metrics(other, kernel)
            if not other_rows:
                raise ConvforgeError(f"--compare {spec}: no 2-D convolution with a {kernel}x{kernel} kernel")
            compare_rows[name] = other_rows
            groups.append((name, extract_filters(other, kernel).filters))
        names, matrix = shift_matrix(groups, kernel=kernel)
        result["compare"] = {"names": names, "matrix": matrix,
                             "summaries": {n: summarize(r) for n, r in compare_rows.items()}}

    out = Path(out) if out else Path("filters") / _safe(meta["id"])
    if pictures:
        result["pictures"] = [str(p) for p in _pictures(model, filters, compare_rows, result, out, kernel, layers)]
    from convforge.fileio import atomic_write_json

    result["metrics_file"] = str(atomic_write_json(out / "metrics.json", {k: v for k, v in result.items()
                                                                            if k != "pictures"}))
    if db:
        from convforge.inspect.db import FilterDB

        with FilterDB(db, "a") as database:
            row = database.append(filters, meta["id"], source=meta["source"],
                            dataset=dataset if dataset is not None else meta["dataset"],
                            task=task if task is not None else meta["task"],
                            architecture=meta["architecture"], metrics=rows)
        result["db"] = {"path": str(db), "appended": row}
        if not quiet:
            echo(f"appended {row['n_filters']:,} filters of {row['n_layers']} layers as {meta['id']!r} "
                 f"to {db}")
    if not quiet:
        _print_layers(result)
        if "compare" in result:
            _print_matrix(result["compare"]["names"], result["compare"]["matrix"])
        for p in result["pictures"]:
            echo(f"wrote {p}")
    if summary and db:
        result["db_summary"] = db_summary(db, quiet)["db_summary"]
    return result


def _pictures(model: Any, filters: Any, compare_rows: dict[str, list[dict[str, Any]]], result: dict[str, Any],
              out: Path, kernel: int, layer_names: Sequence[str]) -> list[Path]:
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
    layers = {info.name: conv for info, conv in conv_layers(model, kernel)}
    wanted = list(layer_names) or list(dict.fromkeys([next(iter(layers)), list(layers)[-1]]))
    for name in wanted:
        if name not in layers:
            raise ConvforgeError(f"--layer {name!r}: no {kernel}x{kernel} convolution of that name; "
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


def db_summary(db: str, quiet: bool = False) -> dict[str, Any]:
    """The summary of a filter database (read in chunks), printed unless ``quiet``."""
    from convforge.inspect.db import FilterDB

    with FilterDB(db, "r") as database:
        summary = database.summary()
    if not quiet:
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
