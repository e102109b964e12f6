"""The report's saliency section: what ``convforge explain CKPT IMG... --out DIR`` wrote, for DIR =
``RUN/explain`` or the run directory itself.

It reads ``explain.json`` (looked for as ``RUN/explain/explain.json`` and ``RUN/explain.json``) by its keys only
(convforge.inspect is a sibling feature package, never imported) and shows, for the first ``MAX_IMAGES`` images,
each image's grid (the image and one overlay per method; the per-method overlays when the grid is missing) with
the predicted class and its probability and the class explained. Pictures are read by bare name from the folder
of explain.json; a broken file is a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convforge.report.markup import esc, fmt, img, notes, png_size
from convforge.report.sidecars import number, read_png, records, sections

PLACES = ("explain/explain.json", "explain.json")
MAX_IMAGES = 8


def explanations_section(run_path: Path, limit: int = MAX_IMAGES) -> str:
    """The section for every explain.json of the run directory ("" when there is none)."""
    parts = sections(run_path, PLACES, "convforge explain",
                     lambda result, folder, shown: _one_result(result, folder, shown, limit))
    if not parts:
        return ""
    return "<h3>Saliency maps (convforge explain)</h3>" + "".join(parts)


def _one_result(result: dict[str, Any], folder: Path, shown: str, limit: int) -> str:
    items = records(result.get("explanations"))
    methods = [str(m) for m in result.get("methods") or []] if isinstance(result.get("methods"), list) else []
    layer = f"; Grad-CAM layer {result['layer']}" if result.get("layer") else ""
    out = [f'<p class="sub">From {esc(shown)}: {esc(result.get("checkpoint", "?"))}; methods '
           f"{esc(', '.join(methods) or '-')}{esc(layer)}. Each picture shows the image, then one overlay per method "
           "(red: where the evidence for the explained class lies).</p>"]
    if not items:
        return "".join(out) + notes([f"{shown} lists no explained images"])
    blocks: list[tuple[str, list[str]]] = []  # consecutive grids share one picture grid, overlays get a card each
    for item in items[:limit]:
        kind, markup = figure(item, folder, methods)
        if kind == "pics" and blocks and blocks[-1][0] == "pics":
            blocks[-1][1].append(markup)
        else:
            blocks.append((kind, [markup]))
    out += [f'<div class="{kind}">{"".join(parts)}</div>' for kind, parts in blocks]
    if len(items) > limit:
        left = len(items) - limit
        out.append(f'<p class="sub">The first {limit} of {len(items)} images are shown; {left} more '
                   f"{'is' if left == 1 else 'are'} left out (see {esc(shown)}).</p>")
    return "".join(out)


def caption(item: dict[str, Any]) -> str:
    """Image name, predicted class and probability, and the explained class when it differs (HTML)."""
    name = Path(str(item.get("image", "?"))).name
    text = (f"<b>{esc(name)}</b>: predicted <b>{esc(item.get('class', '?'))}</b> "
            f"{esc(_percent(item.get('probability')))}")
    target = item.get("target")
    if target is not None and target != item.get("class"):
        text += f"; explained: {esc(target)} {esc(_percent(item.get('target_probability')))}"
    return text


def _percent(probability: Any) -> str:
    return fmt(100.0 * probability, "pct") if number(probability) else "-"


def figure(item: dict[str, Any], folder: Path, methods: list[str]) -> tuple[str, str]:
    """One image's figure and the class of its container: its grid (``pics``), else its overlays captioned by
    method (``card``), else a note."""
    name = Path(str(item.get("image", "?"))).name
    grid = read_png(folder, item.get("grid"))
    if grid is not None:
        tag = _tag(grid, f"saliency grid of {name} ({', '.join(methods)})")
        wide = ' class="wide"' if png_size(grid)[0] > 700 else ""
        return "pics", f"<figure{wide}>{tag}<figcaption>{caption(item)}</figcaption></figure>"
    files = item.get("files") if isinstance(item.get("files"), dict) else {}
    overlays = [(str(method), read_png(folder, file)) for method, file in files.items()]
    cells = "".join(f'<figure>{_tag(data, f"{method} overlay of {name}")}<figcaption>{esc(method)}</figcaption>'
                    "</figure>" for method, data in overlays if data is not None)
    if not cells:
        return "pics", f'<figure><div class="note">no picture of {esc(name)} found</div>' \
                       f"<figcaption>{caption(item)}</figcaption></figure>"
    return "card", f'<div class="wrong">{cells}</div><p class="sub">{caption(item)}</p>'


def _tag(data: bytes, alt: str) -> str:
    """The bare <img> of an embedded PNG (``img`` without its <figure>)."""
    return img(data, alt)[len("<figure>"):-len("</figure>")]
