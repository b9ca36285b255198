"""Charts of storefed's pages as SVG, drawn on the server with matplotlib. Pure.

matplotlib is already a dependency (the quality benchmark draws its PNGs with it), so the
pages need no JavaScript and no asset from elsewhere: a chart is an SVG document whose
text stays text (``svg.fonttype = none``: the browser's own sans-serif font). Every chart
has a table with the same numbers beside it; the chart is for the eye, the table for the
record. matplotlib's figures are not thread-safe: drawing takes one lock.
"""

from __future__ import annotations

import io
import math
import threading
from typing import Mapping, Sequence

_LOCK = threading.Lock()
COLORS = ("#1f5f99", "#d9822b", "#3b8c4a", "#a23b72", "#6c6f73", "#c4302b", "#7b5ea7")

Series = Mapping[str, tuple[Sequence[float], Sequence[float | None]]]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no backend, no global figure state

    fig = Figure(figsize=(width, height), dpi=96)
    return fig, fig.add_subplot()


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "storefed", "font.family": "sans-serif",
                                "font.size": 10}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    return buf.getvalue()


def _clean(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None or not math.isfinite(float(v)) else float(v) for v in values]


def line_chart(series: Series, *, title: str, xlabel: str, ylabel: str, hline: float | None = None,
               hline_label: str = "", step: bool = False, width: float = 7.5, height: float = 3.2,
               markers: bool = True, integer_x: bool = False, log_x: bool = False) -> str:
    """An SVG line chart: ``series`` name → (xs, ys); ``hline`` a dashed level (a budget);
    ``integer_x`` ticks at whole numbers only (rounds), ``log_x`` a logarithmic x axis (ε)."""
    with _LOCK:
        fig, ax = _figure(width, height)
        for i, (name, (xs, ys)) in enumerate(series.items()):
            kw = {"color": COLORS[i % len(COLORS)], "label": name, "linewidth": 1.6}
            if markers and len(xs) <= 40:
                kw["marker"] = "o"
                kw["markersize"] = 3.5
            if step:
                ax.step(list(xs), _clean(ys), where="post", **kw)
            else:
                ax.plot(list(xs), _clean(ys), **kw)
        if hline is not None and math.isfinite(hline):
            ax.axhline(hline, color="#b42318", linestyle="--", linewidth=1.2, label=hline_label or None)
        if integer_x:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log_x:
            from matplotlib.ticker import ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, color="#e3e6ea", linewidth=0.6)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if len(series) > 1 or hline_label:
            ax.legend(fontsize=8, frameon=False, loc="best")
        return _svg(fig)


def bar_chart(labels: Sequence[str], values: Sequence[float | None], *, title: str, ylabel: str,
              hline: float | None = None, hline_label: str = "", width: float = 7.5, height: float = 3.2,
              highlight: Sequence[bool] | None = None) -> str:
    """An SVG bar chart, one bar per label (beyond 60 labels the names are left off);
    ``highlight`` colours the bars that are over a line (e.g. a budget)."""
    with _LOCK:
        fig, ax = _figure(width, height)
        xs = list(range(len(labels)))
        heights = [0.0 if math.isnan(v) else v for v in _clean(values)]
        over = [bool(highlight[i]) if highlight is not None else False for i in xs]
        if len(xs) <= 60:
            ax.bar(xs, heights, color=[COLORS[5] if o else COLORS[0] for o in over], width=0.8, linewidth=0)
        else:  # many stores: two filled outlines (one path each) instead of a patch per bar
            edges = [x - 0.5 for x in xs] + [len(xs) - 0.5]
            ax.stairs([0.0 if o else h for h, o in zip(heights, over)], edges, fill=True, color=COLORS[0])
            if any(over):
                ax.stairs([h if o else 0.0 for h, o in zip(heights, over)], edges, fill=True, color=COLORS[5])
        if len(xs) <= 60:
            ax.set_xticks(xs, list(labels), rotation=90 if len(xs) > 12 else 0, fontsize=8)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(xs)} stores")
        if hline is not None and math.isfinite(hline):
            ax.axhline(hline, color="#b42318", linestyle="--", linewidth=1.2, label=hline_label or None)
            if hline_label:
                ax.legend(fontsize=8, frameon=False, loc="best")
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", color="#e3e6ea", linewidth=0.6)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        return _svg(fig)


def warm() -> None:
    """Import matplotlib and draw once (fonts, caches), so the first page asked is not the slow one."""
    line_chart({"": ([0, 1], [0, 1])}, title="", xlabel="", ylabel="")
