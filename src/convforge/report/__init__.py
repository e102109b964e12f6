"""Self-contained HTML reports of training runs (``convforge report``) and optional TensorBoard logging.

``write_report(run_dirs, out)`` reads each run directory (see :mod:`convforge.report.collect` for the
files it looks for), evaluates its checkpoint on the test split, and writes one HTML file with every
picture embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from convforge.errors import ConfigError
from convforge.fileio import atomic_write_text

__all__ = ["TensorboardLogger", "render_report", "write_report"]


def _labels(paths: Sequence[Path]) -> list[str]:
    """Run names; a name used twice gets its parent folder (then its full path) to tell them apart."""
    labels = [p.name or str(p) for p in paths]
    for attempt in (lambda p: f"{p.parent.name}/{p.name}", lambda p: str(p)):
        if len(set(labels)) == len(labels):
            break
        labels = [attempt(p) if labels.count(label) > 1 else label for p, label in zip(paths, labels)]
    return labels


def render_report(run_dirs: Sequence[str | Path], evaluate: bool = True) -> str:
    """The HTML text of the report for ``run_dirs`` (one run: its details; several: a comparison first)."""
    from convforge.report.collect import collect_run
    from convforge.report.html import render

    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ConfigError("give at least one run directory")
    runs = [collect_run(p, label, evaluate=evaluate) for p, label in zip(paths, _labels(paths))]
    return render(runs)


def write_report(run_dirs: Sequence[str | Path], out: str | Path, evaluate: bool = True) -> Path:
    """Write the report of ``run_dirs`` to ``out`` atomically and return its path.

    ``evaluate=False`` skips loading the checkpoint and the test data (no confusion matrix, wrong
    images or per-stage summary), for a quick look.
    """
    import os

    path = atomic_write_text(Path(out), render_report(run_dirs, evaluate=evaluate))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)  # readable like any other file (temporary files are created 0600)
    except OSError:
        pass
    return path


def __getattr__(name: str):
    if name == "TensorboardLogger":
        from convforge.report.tensorboard import TensorboardLogger

        return TensorboardLogger
    raise AttributeError(name)
