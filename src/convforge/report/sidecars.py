"""Reading what other commands leave in a run directory (robust.json, explain.json and their PNGs), tolerantly.

A file that cannot be read gives a short note instead of an exception; a picture is only ever read by its bare
name from the folder of the JSON that names it, and only when it is a PNG of reasonable size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from convforge.report.collect import MAX_PICTURE_BYTES, PNG_SIGNATURE

MAX_JSON_BYTES = 32 * 1024 * 1024


def find(run_path: Path, places: tuple[str, ...]) -> list[Path]:
    """The files among ``places`` (paths relative to the run directory) that exist, in that order."""
    return [run_path / place for place in places if (run_path / place).is_file()]


def shown_name(run_path: Path, file: Path) -> str:
    """``file`` relative to the run directory (``robust/robust.json``), for captions and notes."""
    try:
        return file.relative_to(run_path).as_posix()
    except ValueError:
        return file.name


def read_json(file: Path, shown: str) -> tuple[Any, str | None]:
    """The parsed file and None, or None and a note saying why it could not be read."""
    try:
        if file.stat().st_size > MAX_JSON_BYTES:
            return None, f"{shown} is larger than {MAX_JSON_BYTES >> 20} MiB; left out"
        return json.loads(file.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"{shown} could not be read ({type(exc).__name__}); left out"


def sections(run_path: Path, places: tuple[str, ...], command: str,
             render: Callable[[dict[str, Any], Path, str], str]) -> list[str]:
    """``render(result, folder, shown)`` of every JSON file among ``places`` that holds an object, else a note
    saying why it was left out (``command`` names what should have written it)."""
    from convforge.report.markup import notes

    parts = []
    for file in find(run_path, places):
        shown = shown_name(run_path, file)
        result, problem = read_json(file, shown)
        if problem is None and not isinstance(result, dict):
            problem = f"{shown} is not a {command} result (no JSON object); left out"
        parts.append(notes([problem]) if problem else render(result, file.parent, shown))
    return parts


def read_png(folder: Path, name: Any) -> bytes | None:
    """The PNG called ``name`` (its directories are dropped) in ``folder``, or None when absent, too large or
    not a PNG."""
    if not isinstance(name, str) or not name.strip():
        return None
    file = folder / Path(name).name
    try:
        if not file.is_file() or file.stat().st_size > MAX_PICTURE_BYTES:
            return None
        data = file.read_bytes()
    except OSError:
        return None
    return data if data.startswith(PNG_SIGNATURE) else None


def number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def records(value: Any) -> list[dict[str, Any]]:
    """The dicts of a list (anything else: empty)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
