"""``convforge filters``: filter metrics, pictures, distribution shift and the filter database."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from convforge.cli.common import Command, add_model_source, add_runtime, load_source, runtime_device
from convforge.errors import ConvforgeError
from convforge.inspect.command import DESCRIPTION


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("--kernel", type=int, default=3, help="kernel size of the filters to inspect (default: 3)")
    parser.add_argument("--out", help="folder for pictures and metrics.json (default: filters/MODEL_ID)")
    parser.add_argument("--no-pictures", action="store_true", help="write no pictures (metrics.json only)")
    parser.add_argument("--layer", action="append", default=[], metavar="NAME",
                        help="also draw this layer's filters (repeatable; default: the first and the last k x k layer)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="B",
                        help="other models (CKPT, MODEL or MODEL=WEIGHTS): pairwise distribution shift matrix and "
                             "heat map")
    parser.add_argument("--db", metavar="FILE.h5", help="append the model's filters to this filter database "
                                                         "(created if absent)")
    parser.add_argument("--summary", action="store_true", help="summarise the --db file (read in chunks)")
    parser.add_argument("--model-id", help="id of the model in the database and the output (default: derived from "
                                           "SOURCE)")
    parser.add_argument("--dataset", help="training data set recorded in the database (default: the checkpoint's data)")
    parser.add_argument("--task", help="task recorded in the database (default: classification for checkpoints)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation of a model name "
                                                            "(default: 0)")
    add_runtime(parser, batch_size=None, image_size=False, tta=False)


def run_filters(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge filters``: resolve the model source, then :func:`convforge.inspect.command.inspect_filters`."""
    from convforge.inspect.command import db_summary, describe, inspect_filters
    from convforge.train.inference import is_checkpoint_path

    if args.model and args.source:
        raise ConvforgeError(f"give either SOURCE ({args.source}) or --model {args.model}, not both")
    if args.summary and not args.db:
        raise ConvforgeError("--summary reads a filter database: give --db FILE.h5")
    if not (args.source or args.model):
        if args.summary:
            return db_summary(args.db, args.json)
        raise ConvforgeError("give a checkpoint or model name (SOURCE), or --db FILE.h5 --summary")
    if args.source and "=" in args.source and not Path(args.source).exists() and not args.weights:
        args.model, args.weights = args.source.split("=", 1)  # the NAME=WEIGHTS form
        args.source = None
    if args.source and args.weights and is_checkpoint_path(args.source):
        raise ConvforgeError(f"--weights goes with a model name, not with the checkpoint {args.source}")
    if args.weights and not Path(args.weights).is_file():
        raise ConvforgeError(f"weight file {args.weights} does not exist")
    if args.source and args.weights:  # a model name given as SOURCE, with its weights
        args.model, args.source = args.source, None
    device = runtime_device(args)
    try:
        loaded = load_source(args, device, seed=args.seed)
    except ConvforgeError as exc:
        if args.source and not is_checkpoint_path(args.source):
            raise ConvforgeError(f"{args.source!r} is neither an existing checkpoint file or run directory nor a "
                                 f"model name: {exc}") from None
        raise
    meta = describe(loaded, args.seed)
    if args.model_id:
        meta["id"] = args.model_id
    return inspect_filters(loaded.model, meta, kernel=args.kernel, out=args.out, pictures=not args.no_pictures,
                           layers=args.layer, compare=args.compare, db=args.db, summary=args.summary,
                           dataset=args.dataset, task=args.task, seed=args.seed, quiet=args.json)


COMMANDS = [
    Command("filters", "filter metrics, pictures, distribution shift, filter database", _add_arguments, run_filters,
            DESCRIPTION, raw_description=True),
]
