"""The HTML building blocks of the report: page CSS, escaping, number formatting, tables, embedded pictures.

Sections of the report (convforge.report.html, convforge.report.dense) build on these; this module
imports nothing of the report, so any section may use it.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any, Iterable, Sequence

CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2330;background:#f5f6f8}
main{max-width:1120px;margin:0 auto;padding:16px 20px 48px}
header{border-bottom:1px solid #d8dbe2;margin-bottom:8px}
h1{font-size:1.55em;margin:.4em 0 .2em}
h2{font-size:1.25em;margin:1.6em 0 .5em;padding-top:.4em;border-top:1px solid #d8dbe2}
h3{font-size:1.05em;margin:1.2em 0 .4em}
.sub{color:#5a6272;font-size:.92em;margin:.2em 0 .8em}
section.run>h2{border-top:3px solid #3b6fd4}
nav{font-size:.92em;margin:.6em 0}
nav a{margin-right:.9em;white-space:nowrap}
a{color:#2b5cc0}
.card{background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:12px 14px;margin:10px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.facts{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:8px}
.fact{background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:8px 10px}
.fact b{display:block;font-size:1.2em}
.fact span{color:#5a6272;font-size:.85em}
img{max-width:100%;height:auto;display:block}
figure{margin:8px 0}
figcaption{color:#5a6272;font-size:.88em;margin-top:4px}
.table-wrap{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:.9em;margin:6px 0;background:#fff}
th,td{border:1px solid #e1e4ea;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#eef1f6;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#fdf1f1;font-weight:600}
.bar{display:inline-block;height:.7em;background:#3b6fd4;border-radius:2px;vertical-align:middle;margin-right:6px}
.wrong{display:grid;grid-template-columns:repeat(auto-fill,minmax(112px,1fr));gap:10px}
.wrong figure{margin:0;background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:6px}
.wrong img{image-rendering:pixelated;width:96px;max-width:100%;margin:0 auto}
.wrong figcaption{font-size:.8em;line-height:1.3;overflow-wrap:anywhere}
.bad{color:#c0392b;font-weight:600}
.ok{color:#1e7d3a}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0;font-size:.9em;overflow-wrap:anywhere}
pre{background:#fff;border:1px solid #e1e4ea;padding:8px 10px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:.85em}
details>summary{cursor:pointer;color:#2b5cc0;margin:6px 0}
.pics{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px;align-items:start}
.pics figure{margin:0;background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:6px}
.pics figure.wide{grid-column:1/-1}
.pics img{max-height:560px;width:auto;max-width:100%;margin:0 auto}
footer{color:#5a6272;font-size:.85em;margin-top:2.5em;border-top:1px solid #d8dbe2;padding-top:.6em}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img(data: bytes | None, alt: str, caption: str | None = None) -> str:
    if not data:
        return ""
    tag = f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{esc(alt)}">'
    if caption:
        return f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>"
    return f"<figure>{tag}</figure>"


def fmt(value: Any, kind: str = "") -> str:
    """Numbers for people: ``pct`` (88.25%), ``count`` (1,234), ``mega`` (1.23 M), ``ms``, ``bytes``."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if kind == "pct":
        return f"{value:.2f}%"
    if kind == "count":
        return f"{int(value):,}"
    if kind == "mega":
        return f"{value / 1e6:.3g} M" if abs(value) < 1e9 else f"{value / 1e9:.3g} G"
    if kind == "ms":
        return f"{value:.3g} ms"
    if kind == "bytes":
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.2f} {unit}"
        return f"{int(value)} B"
    if kind == "speed":
        return f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return f"{value:.4g}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
          row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; cells are escaped unless given as ``("html", markup)``."""
    numeric = set(numeric)
    head = "".join(f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            text = cell[1] if isinstance(cell, tuple) and len(cell) == 2 and cell[0] == "html" else breakable(cell)
            cells.append(f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>")
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f'<div class="table-wrap"><table>{thead}<tbody>{"".join(body)}</tbody></table></div>'


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk ((0, 0) if it is not one)."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return 0, 0
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def breakable(value: Any) -> str:
    """Escaped text with line-break opportunities after , / : = (long data specs and paths wrap)."""
    text = esc(value)
    for char in (",", "/", ":", "="):
        text = text.replace(char, char + "<wbr>")
    return text


def notes(items: Iterable[str]) -> str:
    return "".join(f'<div class="note">{esc(n)}</div>' for n in items)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "run"
