"""What ``convforge report`` runs: write the HTML report of one or more run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def make_report(runs: Sequence[str | Path], out: str | Path | None = None, *, evaluate: bool = True,
                quiet: bool = False) -> dict[str, Any]:
    """Write the report of ``runs`` to ``out`` (default: RUN_DIR/report.html for one run, report.html for
    several); returns {report, runs, bytes}."""
    from convforge.report import write_report

    paths = [Path(r) for r in runs]
    target = Path(out) if out else (paths[0] / "report.html" if len(paths) == 1 else Path("report.html"))
    path = write_report(paths, target, evaluate=evaluate)
    if not quiet:
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB); open it in a browser")
    return {"report": str(path), "runs": [str(r) for r in paths], "bytes": path.stat().st_size}
