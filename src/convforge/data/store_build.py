"""Who builds an image store when several processes want it at once, and how the others wait.

Every build holds an exclusive ``flock`` on ``.<name>.lock`` next to the store and writes a one-line
record into it: ``building`` (with its pid, host and start time) while it works, ``failed`` (with the
error) or ``done`` when it ends. Under torchrun (``LOCAL_RANK`` set) only local rank 0 builds, with all
its worker processes; the other local ranks never build: they poll for the finished store (its
``meta.json`` with the right key), report progress every ``REPORT_S`` seconds, and stop with a clear
error when the builder failed, died mid-way (its record says ``building`` but nobody holds the lock),
or never started within ``START_GRACE_S``. No collective (NCCL/gloo) call is made while waiting, so no
collective time-out can fire during a long build. Without ``LOCAL_RANK`` a second build of the same
store (another process or thread) waits on the lock, then reuses the store the first one built.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from convforge.data.paths import printable
from convforge.errors import DataError

POLL_S = 1.0  # seconds between two looks at the store while waiting
REPORT_S = 30.0  # seconds between two progress messages while waiting
START_GRACE_S = 600.0  # a waiter gives up when no build has started (or finished) within this


def lock_path(out: Path) -> Path:
    """The lock (and build record) file of the store at ``out``."""
    return out.parent / f".{out.name}.lock"


def is_builder(local_rank: int | None = None) -> bool:
    """Whether this process may build stores: local rank 0, or any process outside torchrun.
    ``local_rank`` None: read ``LOCAL_RANK`` from the environment."""
    if local_rank is None:
        text = os.environ.get("LOCAL_RANK", "").strip()
        local_rank = int(text) if text.isdigit() else 0
    return local_rank == 0


def _write_record(handle, record: dict) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record) + "\n")
    handle.flush()


def read_record(out: Path) -> dict:
    """The last build record of the store at ``out`` ({} when none could be read)."""
    try:
        record = json.loads(lock_path(out).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


@contextmanager
def build_lock(out: Path, log: Callable[[str], None], report_s: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock of the store at ``out`` (waiting, with a message every ``report_s`` seconds,
    while another process holds it) and keep its build record: ``building``, then ``done`` or ``failed``."""
    report_s = REPORT_S if report_s is None else report_s
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(out), "a+") as handle:
        started = time.monotonic()
        next_report = 0.5  # a waiter's short look at the lock is no reason to say anything
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                elapsed = time.monotonic() - started
                if elapsed >= next_report:
                    log(f"waiting for another process that is building the image store {printable(out)}"
                        f"{_progress_text(out)} ({elapsed:.0f} s so far)")
                    next_report = elapsed + report_s
                time.sleep(0.05 if elapsed < 1 else POLL_S)
        try:
            _write_record(handle, {"state": "building", "pid": os.getpid(), "host": socket.gethostname(),
                                   "started": time.time()})
            try:
                yield
            except BaseException as exc:
                _write_record(handle, {"state": "failed", "pid": os.getpid(), "host": socket.gethostname(),
                                       "error": str(exc) or type(exc).__name__})
                raise
            _write_record(handle, {"state": "done", "pid": os.getpid(), "host": socket.gethostname()})
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _lock_is_free(out: Path) -> bool:
    """True when no process holds the lock of the store at ``out`` (tested without keeping it)."""
    try:
        with open(lock_path(out), "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return True
    except OSError:
        return True


def _progress_text(out: Path) -> str:
    """``: K chunks decoded`` from an unfinished build's progress record, or ''."""
    try:
        done = len((out.parent / f".{out.name}.partial" / "progress.jsonl").read_text().splitlines())
    except OSError:
        return ""
    return f": {done} chunk(s) decoded" if done else ""


def wait_for_store(out: Path, is_built: Callable[[], bool], log: Callable[[str], None], *,
                   poll_s: float | None = None, report_s: float | None = None,
                   start_grace_s: float | None = None) -> None:
    """Wait (without building) until ``is_built()`` says the store at ``out`` is finished; DataError when
    its builder failed, died before finishing, or none started within ``start_grace_s`` seconds."""
    poll_s = POLL_S if poll_s is None else poll_s
    report_s = REPORT_S if report_s is None else report_s
    start_grace_s = START_GRACE_S if start_grace_s is None else start_grace_s
    where = printable(out)
    started = time.monotonic()
    next_report = 0.0
    while True:
        if is_built():
            return
        free = _lock_is_free(out)
        if is_built():  # finished between the two looks
            return
        record = read_record(out)
        elapsed = time.monotonic() - started
        state = record.get("state") if free else "building"
        if state == "failed":
            raise DataError(f"the process that built the image store {where} (pid {record.get('pid')} on "
                            f"{record.get('host')}) failed: {record.get('error')}")
        if free and state == "building":
            raise DataError(
                f"the process that was building the image store {where} (pid {record.get('pid')} on "
                f"{record.get('host')}) ended before finishing it (killed?): see its log, then run again "
                f"(the build resumes where it stopped)"
            )
        if free and elapsed > start_grace_s:
            raise DataError(
                f"waited {elapsed:.0f} s for the image store {where}, but no process is building it: under "
                f"torchrun local rank 0 builds it (is it running, with the same data and --store-size?)"
            )
        if elapsed >= next_report:
            who = f"pid {record.get('pid')}" if not free and record.get("pid") else "local rank 0"
            log(f"waiting for {who} to build the image store {where}{_progress_text(out)} ({elapsed:.0f} s so far)")
            next_report = elapsed + report_s
        time.sleep(poll_s)
