"""``convforge models`` (the registry) and ``convforge import`` (foreign weights as a convforge checkpoint)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from convforge.cli.common import Command, add_json, add_model_source, parse_image_size, source_kwargs
from convforge.errors import ConfigError


def _add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", help="wildcard (resnet*) or substring filter")
    add_json(parser)


def run_models(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge models``: registered models with params and MACs at their default input size."""
    import torch

    from convforge.measure import count_macs, count_params
    from convforge.models import create_model, list_models, model_info
    from convforge.progress import progress_iter

    rows = []
    names = list_models(args.pattern)
    for name in progress_iter(names, len(names), "measuring params and MACs"):
        info = model_info(name)
        with torch.device("meta"):
            model = create_model(name)
        row = info.as_dict()
        row.update({"params": count_params(model), "macs": count_macs(model, info.input_size)})
        rows.append(row)
    if not args.json:
        _print_models(rows, args.pattern)
    return {"models": rows}


def _print_models(rows: list[dict[str, Any]], pattern: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} model(s)" + (f" matching {pattern!r}" if pattern else ""))
    numeric = ("params", "MACs", "published params", "published MACs", "published top-1")
    for column in ("name", "family", "input", *numeric, "weights' eval", "paper"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for r in rows:
        cfg = r.get("pretrained_cfg")  # e.g. "256/224 bilinear": resize, centre crop, interpolation
        evaluation = f"{cfg['resize']}/{cfg['input_size'][-1]} {cfg['interpolation']}" if cfg else "-"
        table.add_row(r["name"], r["family"], "x".join(map(str, r["input_size"])), f"{r['params'] / 1e6:.3f} M",
                      f"{r['macs'] / 1e6:.1f} M",
                      f"{r['published_params'] / 1e6:.3f} M" if r["published_params"] else "-",
                      f"{r['published_macs'] / 1e6:.1f} M" if r["published_macs"] else "-",
                      f"{r['published_top1']:.2f}%" if r["published_top1"] else "-",
                      evaluation,
                      f"{r['paper']} ({r['year']})" if r["paper"] else "-")
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights_file", metavar="WEIGHTS", help="foreign weight file (.pth/.th/.pt, loaded with "
                                                                "weights_only=True, or .safetensors)")
    add_model_source(parser, positional=False)
    parser.add_argument("--data", help="data spec the model is for: its classes, and its statistics when no "
                                       "--mean/--std are given; recorded as the checkpoint's own data")
    parser.add_argument("--classes", help="comma-separated class names (instead of --data)")
    parser.add_argument("--image-size", type=parse_image_size, metavar="N|HxW",
                        help="input size the model expects (default: the data's, else the registry's)")
    parser.add_argument("--out", required=True, help="checkpoint to write (.safetensors, plus its .json sidecar)")
    add_json(parser)


def run_import(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge import``: a self-describing convforge checkpoint from foreign weights, without training."""
    from convforge.train.inference import classes_for, load_data, save_loaded

    if not args.model:
        raise ConfigError("convforge import needs --model NAME: the architecture the weights were saved from")
    if args.weights and args.weights != args.weights_file:
        raise ConfigError(f"give the weight file once (WEIGHTS {args.weights_file} or --weights {args.weights})")
    if args.data and args.classes:
        raise ConfigError("give either --data SPEC or --classes a,b,c, not both")
    kwargs = source_kwargs(args)
    kwargs["weights"] = args.weights_file
    data = load_data(args.data, args.image_size) if args.data else None
    if data is not None:
        kwargs["num_classes"] = args.num_classes or data.num_classes
        kwargs["classes"] = classes_for(data, args.num_classes)
        kwargs["image_size"] = args.image_size or tuple(data.image_size)
    elif args.classes:
        kwargs["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    from convforge.train.inference import load_model

    loaded = load_model(**kwargs)
    if args.image_size:
        loaded.meta["image_size"] = args.image_size
    path = save_loaded(loaded, args.out, data)
    result = {"checkpoint": str(path), "sidecar": str(path.with_suffix(".json")), "model": loaded.name,
              "task": loaded.task, "classes": loaded.classes, "input_size": list(loaded.input_size),
              "normalization": loaded.meta.get("normalization") or _read_norm(path), "source": args.weights_file}
    if not args.json:
        print(f"wrote {path} and {path.with_suffix('.json')}: {loaded.name} ({loaded.task}, "
              f"{len(loaded.classes)} classes, input {'x'.join(map(str, loaded.input_size))}) from {args.weights_file}")
    return result


def _read_norm(path: Any) -> dict[str, Any]:
    from convforge.train.checkpoint import read_checkpoint_meta

    return read_checkpoint_meta(path)["normalization"]


COMMANDS = [
    Command("models", "list registered models with params and MACs", _add_models_arguments, run_models,
            "List registered models; params and MACs are measured at the default input size."),
    Command("import", "write foreign weights as a self-describing convforge checkpoint", _add_import_arguments,
            run_import, "Read a foreign weight file for a registry model (--model NAME) and write a convforge "
                        "checkpoint (safetensors + JSON sidecar) that records the task, classes, input size, "
                        "normalisation and source file, so every command can use it without further flags."),
]
