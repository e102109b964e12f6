"""``convforge report RUN_DIR [RUN_DIR ...] [--out FILE]``: the command-line side of the HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable


def add_parser(sub: Any, add_json: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "report", help="write a self-contained HTML report of one or more runs",
        description="Write one HTML file (pictures embedded, nothing loaded from the network) with the run's "
                    "configuration and environment, learning curves, confusion matrix, per-class accuracy, the most "
                    "confidently wrong test images, a per-stage model summary, and the bench/prune/quantize/export "
                    "JSON and filter pictures found in the run directory. Several runs: overlaid curves, a comparison "
                    "table and accuracy against latency with the Pareto front.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (the --out of convforge train)")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html for one run, report.html for several)")
    p.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="do not load the checkpoint and test data (no confusion matrix, wrong images or per-stage summary)")
    add_json(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.report import write_report

    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else (runs[0] / "report.html" if len(runs) == 1 else Path("report.html"))
    path = write_report(runs, out, evaluate=args.evaluate)
    if not args.json:
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB); open it in a browser")
    return {"report": str(path), "runs": [str(r) for r in runs], "bytes": path.stat().st_size}
