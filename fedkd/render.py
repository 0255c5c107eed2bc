"""Report rendering: a list of blocks (headings, lists, tables, images) as Markdown or HTML.

Kept apart from `fedkd.report`, which decides what a report says; this module only decides how
it looks in each format.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

Block = tuple[Any, ...]  # ("h1"|"h2"|"p", text) | ("ul", items) | ("table", headers, rows) | ("img", file, alt)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def to_markdown(blocks: Sequence[Block]) -> str:
    def cell(x: Any) -> str:
        return _fmt(x).replace("|", "\\|").replace("\n", " ")

    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {args[0]}")
        elif kind == "p":
            out.append(args[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            head, rows = args
            out.append("\n".join(["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head),
                                  *("| " + " | ".join(map(cell, row)) + " |" for row in rows)]))
        elif kind == "img":
            out.append(f"![{args[1]}]({args[0]})")
    return "\n\n".join(out) + "\n"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
       "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}")


def to_html(blocks: Sequence[Block], base: Path, title: str) -> str:
    """Self-contained HTML: PNGs from `base` embedded as base64 data URIs, inline CSS."""
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for kind, *args in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{esc(args[0])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{esc(str(i))}</li>" for i in args[0]) + "</ul>")
        elif kind == "table":
            head, rows = args
            out.append("<table><tr>" + "".join(f"<th>{esc(_fmt(h))}</th>" for h in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
                       + "</table>")
        elif kind == "img":
            data = base64.b64encode((base / args[0]).read_bytes()).decode()
            out.append(f"<figure><img alt='{esc(args[1])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{esc(args[1])}</figcaption></figure>")
    return "\n".join(out) + "\n</body></html>\n"
