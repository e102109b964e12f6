"""Progress display: a rich progress bar on a terminal, plain lines elsewhere (logs, CI, pipes)."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console

T = TypeVar("T")

# Human-readable output goes to stderr so that stdout stays clean for --json.
console = Console(stderr=True, highlight=False)


def interactive() -> bool:
    return console.is_terminal


def progress_iter(items: Iterable[T], total: int, label: str) -> Iterator[T]:
    """Iterate with a progress bar when stderr is a terminal; silently otherwise."""
    if not interactive():
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        for item in items:
            yield item
            progress.advance(task)


def echo(message: str) -> None:
    console.print(message, markup=False, soft_wrap=True)
    sys.stderr.flush()


class EpochBar:
    """One epoch's progress bar with loss, accuracy and images/s (only on a terminal)."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> "EpochBar":
        if self.enabled and interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}%  {task.fields[ips]:.0f} img/s"),
                console=console, transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, loss=0.0, acc=0.0, ips=0.0)
        return self

    def update(self, completed: int, loss: float, acc: float, images_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, loss=loss, acc=acc, ips=images_per_s)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
