"""The ``convforge`` command line: one parser assembled from the ``COMMANDS`` of each command module.

train, recipes (cli/train.py); eval, predict, segment, upscale (cli/evaluate.py); models, import
(cli/models.py); bench, export, quantize, prune (cli/deploy.py); filters (cli/filters.py); report
(cli/report.py); explain (cli/explain.py); robust (cli/robust.py); serve (cli/serve.py). Every model command
takes the same model sources and runtime options (cli/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Sequence

from convforge.cli.common import Command
from convforge.errors import ConvforgeError

MODULES = ("train", "evaluate", "models", "deploy", "filters", "report", "explain", "robust", "serve")


def all_commands() -> list[Command]:
    """Every subcommand, in the order of ``convforge --help``."""
    from importlib import import_module

    return [command for module in MODULES for command in import_module(f"convforge.cli.{module}").COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    """The ``convforge`` parser with one subparser per command."""
    from convforge.version import __version__

    parser = argparse.ArgumentParser(prog="convforge", description="Convolutional networks for images: train, "
                                                                   "evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"convforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in all_commands():
        extra = {"formatter_class": argparse.RawDescriptionHelpFormatter} if command.raw_description else {}
        subparser = sub.add_parser(command.name, help=command.help, description=command.description or None, **extra)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def _raise_interrupt(signum: int, frame: Any) -> None:
    from convforge.train.engine import TrainingInterrupted

    raise TrainingInterrupted(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convforge`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from convforge.train.engine import TrainingInterrupted

    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if getattr(args, "nproc_per_node", None) and "TORCHELASTIC_RUN_ID" not in os.environ:
            from convforge.cli.train import launch_processes

            return launch_processes(args.nproc_per_node, argv)
        result = args.run(args)
    except ConvforgeError as exc:
        print(f"convforge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingInterrupted as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and result is not None:
        try:
            print(json.dumps(result), flush=True)
        except BrokenPipeError:
            pass
    return 0
