"""Fault injection for the reliability tests: crash or fail at a named point of a run.

``CONVFORGE_FAULTS`` holds ``;``-separated rules ``POINT@N:ACTION``: at the N-th time this
process reaches POINT, do ACTION. Points are ``step`` (after an optimizer step), ``eval``
(before an evaluation) and ``write:FILENAME`` (inside an atomic write, after the temporary
file is written and before it replaces FILENAME). Actions: ``kill`` (SIGKILL this process,
as a power cut or the OOM killer would), ``enospc`` (raise "no space left on device").
Unset, every call is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

from convforge.errors import ConfigError

ENV = "CONVFORGE_FAULTS"
ACTIONS = ("kill", "enospc")


def _parse(text: str) -> dict[tuple[str, int], str]:
    rules: dict[tuple[str, int], str] = {}
    for rule in filter(None, (part.strip() for part in text.split(";"))):
        point, _, rest = rule.rpartition("@")
        count, _, action = rest.partition(":")
        if not point or not count.isdigit() or action not in ACTIONS:
            raise ConfigError(f"{ENV}: cannot parse rule {rule!r}; expected POINT@N:ACTION with ACTION in {ACTIONS}")
        rules[(point, int(count))] = action
    return rules


_rules: dict[tuple[str, int], str] | None = None
_hits: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Count one arrival at ``point`` and carry out the rule for it, if there is one."""
    global _rules
    if _rules is None:
        _rules = _parse(os.environ.get(ENV, ""))
    if not _rules:
        return
    _hits[point] = _hits.get(point, 0) + 1
    action = _rules.get((point, _hits[point]))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)
