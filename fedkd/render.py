"""Report rendering: a list of blocks (headings, lists, tables, images) as Markdown or HTML.

Kept apart from `fedkd.report`, which decides what a report says; this module only decides how
it looks in each format. HTML comes from a Jinja2 template (`fedkd/templates/report.html.j2`):
one self-contained file (inline CSS, figures as data URIs, no scripts, no network requests) that
reads on a phone and on a desktop; Markdown keeps prose within 80 columns.
"""

from __future__ import annotations

import base64
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2

# ("h1"|"h2"|"p"|"line", text) | ("ul", items) | ("table", headers, rows[, Table options])
# | ("img", file, alt[, caption]) | ("failures", [Failure, ...])
Block = tuple[Any, ...]
WIDTH = 80  # Markdown prose is wrapped here (tables and long words cannot be)


@dataclass
class TableOptions:
    """How a table reads: rows to highlight (failed clients), a note under it."""

    highlight: frozenset[int] = frozenset()  # row indexes
    note: str = ""
    left: int = 1  # how many leading columns are text (left-aligned); the rest are numbers
    text: frozenset[int] = frozenset()  # other text columns, by index

    def is_text(self, column: int) -> bool:
        return column < self.left or column in self.text


@dataclass
class Failure:
    """One failed client call: the exception line up front, the traceback one click away."""

    round: int
    phase: str
    partition_id: Any
    error: str  # the exception's type and message
    traceback: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB': byte counts a reader can compare at a glance."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # unreachable


def _wrap(text: str, prefix: str = "") -> str:
    return textwrap.fill(text, WIDTH, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                         break_long_words=False, break_on_hyphens=False)


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown; prose wrapped at 80 columns."""
    def cell(x: Any) -> str:
        return _fmt(x).replace("|", "\\|").replace("\n", " ")

    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {args[0]}")
        elif kind == "p":
            out.append(_wrap(args[0]))
        elif kind == "line":  # holds a command to copy: never broken across lines
            out.append(args[0])
        elif kind == "ul":
            out.append("\n".join(_wrap(str(item), "- ") for item in args[0]))
        elif kind == "table":
            head, rows = args[0], args[1]
            opts = args[2] if len(args) > 2 else TableOptions()
            align = "|" + "".join("---|" if opts.is_text(i) else "--:|" for i in range(len(head)))
            out.append("\n".join(["| " + " | ".join(map(cell, head)) + " |", align,
                                  *("| " + " | ".join(map(cell, row)) + " |" for row in rows)]))
            if opts.note:
                out.append(_wrap(opts.note))
        elif kind == "failures":
            out.append("\n".join(["| round | phase | client | error |", "|--:|---|--:|---|",
                                  *(f"| {f.round} | {f.phase} | {f.partition_id} | {cell(f.error)} |"
                                    for f in args[0])]))
        elif kind == "img":
            out.append(f"![{args[1]}]({args[0]})")
            if len(args) > 2 and args[2]:
                out.append(_wrap(args[2]))
    return "\n\n".join(out) + "\n"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("fedkd", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    return env


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def to_html(blocks: Sequence[Block], base: Path, title: str) -> str:
    """Self-contained HTML: PNGs from `base` embedded as base64 data URIs, inline CSS."""
    items: list[dict[str, Any]] = []
    for kind, *args in blocks:
        if kind == "table":
            opts = args[2] if len(args) > 2 else TableOptions()
            items.append({"kind": kind, "head": args[0], "rows": args[1], "opts": opts})
        elif kind == "img":
            items.append({"kind": kind, "src": _data_uri(base / args[0]), "alt": args[1],
                          "caption": args[2] if len(args) > 2 else args[1]})
        elif kind == "failures":
            items.append({"kind": kind, "failures": args[0]})
        else:  # "line" is a paragraph that Markdown does not wrap
            items.append({"kind": "p" if kind == "line" else kind, "value": args[0]})
    return _environment().get_template("report.html.j2").render(title=title, blocks=items)
