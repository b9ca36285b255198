"""HTML pieces of storefed's pages: escaping, numbers, tables, one page shell. Pure.

Every page is one HTML document with its style inline: no script, no font, no stylesheet
from anywhere else, so it renders on a machine without internet and reads without
JavaScript. Every value put into a page goes through :func:`esc` unless it is :class:`Raw`
(HTML this module or a chart built).
"""

from __future__ import annotations

import html
import math
from typing import Iterable, Sequence


class Raw(str):
    """Text that is already HTML (built here): put into a page as it is."""


def esc(value: object) -> str:
    """``value`` as HTML text (Raw passes through)."""
    if isinstance(value, Raw):
        return value
    return html.escape("" if value is None else str(value), quote=True)


def num(value: object, digits: int = 4) -> str:
    """A number as the pages write it: ``digits`` decimals for a float, an int as it is,
    "–" for none (None, NaN) and "∞" for an unbounded ε."""
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}f}"


def table(headers: Sequence[object], rows: Iterable[Sequence[object]], *, cls: str = "", caption: str = "",
          test_id: str = "") -> Raw:
    """A table; cells are escaped unless Raw. ``test_id`` becomes ``data-testid``."""
    attrs = (f' class="{esc(cls)}"' if cls else "") + (f' data-testid="{esc(test_id)}"' if test_id else "")
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return Raw(f"<table{attrs}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def link(href: str, text: object) -> Raw:
    """An ``<a>`` to a path of the same site."""
    return Raw(f'<a href="{esc(href)}">{esc(text)}</a>')


def tag(name: str, text: object, **attrs: object) -> Raw:
    """``<name attrs>text</name>``; ``class_`` stands for ``class``."""
    rendered = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Raw(f"<{name}{rendered}>{esc(text)}</{name}>")


STYLE = """
:root { color-scheme: light; --ink: #1b1f24; --muted: #5b6470; --line: #d6dbe1; --bad: #b42318; --ok: #146c2e;
        --warn: #8a5a00; --head: #f3f5f7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0; }
header { background: #14324a; color: #fff; padding: 10px 24px; display: flex; gap: 24px; align-items: baseline; }
header a { color: #cfe3f5; } header strong { font-size: 16px; }
main { padding: 16px 24px 40px; max-width: 1400px; }
h1 { font-size: 20px; margin: 8px 0 4px; } h2 { font-size: 16px; margin: 24px 0 6px; } h3 { font-size: 14px; }
p.note, .muted { color: var(--muted); }
table { border-collapse: collapse; margin: 6px 0 14px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: var(--head); }
.scroll { max-height: 520px; overflow: auto; display: inline-block; max-width: 100%; }
.bad { color: var(--bad); font-weight: 600; } .ok { color: var(--ok); } .warn { color: var(--warn); }
.chart { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); margin: 6px 0 14px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0 16px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 160px; }
.card b { display: block; font-size: 18px; }
form.signin { max-width: 360px; border: 1px solid var(--line); border-radius: 6px; padding: 16px; }
form.signin input[type=password] { width: 100%; padding: 6px; margin: 6px 0 10px; font: inherit; }
button { font: inherit; padding: 5px 14px; }
code { background: var(--head); padding: 0 3px; border-radius: 3px; }
"""


def page(title: str, body: str, *, nav: Sequence[tuple[str, str]] = (), brand: str = "storefed") -> str:
    """A whole HTML document: ``nav`` is (href, text) links in the header."""
    links = " ".join(str(link(href, text)) for href, text in nav)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
            f"<body><header><strong>{esc(brand)}</strong>{links}</header><main>{body}</main></body></html>")
