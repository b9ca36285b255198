"""`storefed dashboard`: the operator's pages over run results, as an ASGI app (Starlette,
which FastAPI is built on) served by uvicorn.

Pages: ``/`` the runs, ``/runs/<id>`` one run or benchmark, its charts at
``/runs/<id>/<name>.svg`` and a benchmark's plots at ``/runs/<id>/files/<name>``. Nothing is
loaded from elsewhere (the Content-Security-Policy says so to the browser too); the pages
have no script. Results hold no member data, but they do name the stores and their
privacy spend: the dashboard binds to loopback unless told otherwise.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from common.exchange.address import is_loopback
from common.view import charts
from server.dashboard import pages
from server.dashboard.runs import REPORT, DamagedRun, RunIndex, Summary

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_FILE = re.compile(r"[\w.-]+\.(png|svg)")
_CHART_NAMES = ("quality", "epsilon", "explore")


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=HEADERS)


def quality_chart(results: dict) -> str:
    """NDCG@10 per round: the served model, the global model and the baselines."""
    series: dict = {}
    for name, label in (("served", "served model"), ("global_model", "global model"), ("store_pop", "store_pop"),
                        ("p_topfreq", "p_topfreq")):
        points = [(r["round"], (r.get("quality") or {}).get(name, r.get("ndcg@10") if name == "served" else None))
                  for r in results.get("per_round", [])]
        if any(v is not None for _, v in points):
            series[label] = ([p[0] for p in points], [p[1] for p in points])
    return charts.line_chart(series, title="NDCG@10 per round", xlabel="round", ylabel="NDCG@10",
                             integer_x=True)


def epsilon_chart(results: dict) -> str:
    """ε spent per store, against the budget (bars over it in red)."""
    privacy = results.get("privacy", {})
    stores = sorted(privacy)
    eps = [privacy[s].get("epsilon") for s in stores]
    budgets = {privacy[s].get("budget") for s in stores if privacy[s].get("budget") is not None}
    over = [e is not None and privacy[s].get("budget") is not None and e > privacy[s]["budget"] + 1e-9
            for s, e in zip(stores, eps)]
    budget = budgets.pop() if len(budgets) == 1 else None
    return charts.bar_chart(stores, eps, title="ε spent per store", ylabel="ε", hline=budget,
                            hline_label=f"budget {budget:g}" if budget is not None else "", highlight=over)


def explore_chart(results: dict) -> str:
    """Explore NDCG@10 against ε: served and global alone, with the references as levels."""
    methods = results["methods"]

    def explore(name: str):
        return ((methods.get(name) or {}).get("member_weighted") or {}).get("explore", {}).get("ndcg@10")

    eps = sorted({e for e in map(pages._eps_of, methods) if e is not None})
    series = {"served (with local layer)": (eps, [explore(f"fed_dp_eps{e:g}") for e in eps]),
              "global model alone": (eps, [explore(f"fed_dp_eps{e:g}_global") for e in eps])}
    for ref in ("fed_nodp", "store_pop"):
        if explore(ref) is not None and eps:
            series[f"{ref} (no ε)"] = (eps, [explore(ref)] * len(eps))
    return charts.line_chart(series, title="explore NDCG@10 against ε", xlabel="ε per store (log scale)",
                             ylabel="NDCG@10", log_x=True)


def create_dashboard(index: RunIndex) -> Starlette:
    """The dashboard's ASGI app over ``index``."""
    svg_cache: dict[tuple, str] = {}
    svg_lock = threading.Lock()

    def listing(request: Request) -> Response:
        started = time.perf_counter()
        rows = index.list()
        return _html(pages.runs_page(rows, [str(r) for r in index.roots], (time.perf_counter() - started) * 1000))

    def _load(key: str) -> tuple[Summary | None, dict | None, Response | None]:
        summary = index.find(key)
        if summary is None:
            return None, None, _html(pages.error_page("No such run", f"no run has the id {key}; see the list"), 404)
        if summary.kind in ("report", "incomplete"):
            return summary, None, None
        if summary.damaged:
            return summary, None, _html(pages.error_page("Damaged run", f"{summary.path}: {summary.status}"), 422)
        try:
            return (*index.load(key), None)
        except DamagedRun as exc:
            return summary, None, _html(pages.error_page("Damaged run", f"{summary.path}: damaged: {exc}"), 422)
        except KeyError:
            return None, None, _html(pages.error_page("No such run", f"no run has the id {key}"), 404)

    def run(request: Request) -> Response:
        key = request.path_params["key"]
        summary, results, error = _load(key)
        if error is not None:
            return error
        if summary.kind == "incomplete":
            return _html(pages.error_page("No results yet", f"{summary.path}: {summary.status}"), 404)
        report_path = Path(summary.path) / REPORT
        report = report_path.read_text(encoding="utf-8", errors="replace") if report_path.exists() else None
        if summary.kind in ("benchmark", "report"):
            chart = {"explore": f"/runs/{key}/explore.svg"} if results is not None else {}
            return _html(pages.benchmark_page(summary, results, report, chart, f"/runs/{key}/files"))
        chart = {"quality": f"/runs/{key}/quality.svg", "epsilon": f"/runs/{key}/epsilon.svg"}
        if not any(r.get("ndcg@10") is not None for r in results.get("per_round", [])):
            chart.pop("quality")
        return _html(pages.run_page(summary, results, chart))

    def chart(request: Request) -> Response:
        key, name = request.path_params["key"], request.path_params["name"]
        if name not in _CHART_NAMES:
            return Response("no such chart", status_code=404, headers=HEADERS)
        summary, results, error = _load(key)
        if error is not None or results is None:
            return error or Response("no results", status_code=404, headers=HEADERS)
        draw = {"quality": quality_chart, "epsilon": epsilon_chart, "explore": explore_chart}[name]
        if (name == "explore") != (summary.kind == "benchmark"):
            return Response("no such chart for this run", status_code=404, headers=HEADERS)
        cache_key = (key, summary.stamp, name)
        with svg_lock:
            svg = svg_cache.get(cache_key)
        if svg is None:
            svg = draw(results)
            with svg_lock:
                if len(svg_cache) > 64:
                    svg_cache.clear()
                svg_cache[cache_key] = svg
        return Response(svg, media_type="image/svg+xml", headers=HEADERS)

    def files(request: Request) -> Response:
        key, name = request.path_params["key"], request.path_params["name"]
        summary = index.find(key)
        if summary is None or not _FILE.fullmatch(name):
            return Response("not found", status_code=404, headers=HEADERS)
        path = Path(summary.path) / name
        if not path.is_file() or path.resolve().parent != Path(summary.path).resolve():
            return Response("not found", status_code=404, headers=HEADERS)
        return FileResponse(path, headers=HEADERS)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _html(pages.error_page("Not found", f"nothing at {request.url.path}"), 404)

    return Starlette(routes=[
        Route("/", listing),
        Route("/runs/{key:str}", run),
        Route("/runs/{key:str}/files/{name:str}", files),
        Route("/runs/{key:str}/{name:str}.svg", chart),
    ], exception_handlers={404: not_found})


def serve_dashboard(runs: Sequence[Path | str], host: str = "127.0.0.1", port: int = 8090, *,
                    cache_file: Path | None = None) -> None:
    """`storefed dashboard`: serve the pages over ``runs`` on ``host:port`` until stopped.

    Raises :class:`server.dashboard.runs.RunsError` (one line naming the directory) before
    anything is served when a ``runs`` directory does not exist. ``cache_file``: where run
    summaries are kept across restarts (default: none)."""
    import uvicorn

    from server.dashboard.runs import RunIndex

    index = RunIndex(runs, cache_file=cache_file)
    rows = index.list(fresh=True)
    damaged = sum(1 for s in rows if s.damaged)
    print(f"storefed dashboard: {len(rows)} runs and reports under {', '.join(map(str, index.roots))}"
          f"{f' ({damaged} damaged)' if damaged else ''}; http://{host}:{port}/", flush=True)
    if not is_loopback(host):
        print(f"storefed dashboard: warning: {host} is not loopback: anyone who reaches it sees every run's stores "
              "and their privacy spend (there is no sign-in)", file=sys.stderr, flush=True)
    threading.Thread(target=charts.warm, name="chart-warmup", daemon=True).start()
    uvicorn.run(create_dashboard(index), host=host, port=port, log_level="warning", access_log=False)
