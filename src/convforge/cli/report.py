"""``convforge report RUN_DIR [RUN_DIR ...] [--out FILE]``: the self-contained HTML report."""

from __future__ import annotations

import argparse
from typing import Any

from convforge.cli.common import Command, add_json


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (the --out of convforge train)")
    parser.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html for one run, report.html for "
                                      "several)")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false",
                        help="do not load the checkpoint and test data (no confusion matrix, wrong images or "
                             "per-stage summary)")
    add_json(parser)


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge report``: :func:`convforge.report.command.make_report` with the parsed options."""
    from convforge.report.command import make_report

    return make_report(args.runs, args.out, evaluate=args.evaluate, quiet=args.json)


COMMANDS = [
    Command("report", "write a self-contained HTML report of one or more runs", _add_arguments, run_report,
            "Write one HTML file (pictures embedded, nothing loaded from the network) with the run's configuration "
            "and environment, learning curves, confusion matrix, per-class accuracy, the most confidently wrong test "
            "images, a per-stage model summary, and the bench/prune/quantize/export JSON and filter pictures found "
            "in the run directory. Several runs: overlaid curves, a comparison table and accuracy against latency "
            "with the Pareto front."),
]
