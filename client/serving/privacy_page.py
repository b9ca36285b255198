"""The store's privacy page (`storefed serve`, ``/privacy``): what this store spent and sent.

Everything on it is read from the store's own files — the privacy ledger through
:func:`client.state.privacy_report.privacy_report` (so its numbers are those of `storefed
privacy --json`), the kept model and its layer, the reply log
(:mod:`client.state.reply_log`: what left the store, and every decline and refusal) — and
from the serving process itself (its start-up validation's row counts, its latency). It
is shown only behind the store's key (:mod:`client.serving.api`); it lists no member.

The page is HTML without script; the one chart (ε over the ledger's rounds against the
budget) is an SVG drawn here with matplotlib (:mod:`common.view.charts`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from client.state import reply_log
from client.state.ledger import head_path, ledger_path
from client.state.model_store import PREV_INFO_FILE, read_info
from common.view.html import Raw, esc, num, page, table, tag

if TYPE_CHECKING:
    from client.serving.service import StoreServing

CURVE_POINTS = 60  # ε after each round is computed for at most this many rounds (one accountant call each)
REPLIES_SHOWN = 100
REFUSALS_SHOWN = 50


class Latency:
    """The serving time of the last ``keep`` API requests (seconds), for percentiles."""

    def __init__(self, keep: int = 10_000) -> None:
        self.samples: deque[float] = deque(maxlen=keep)
        self.count = 0

    def add(self, seconds: float) -> None:
        """Record one request's time from its arrival to the end of its answer."""
        self.samples.append(seconds)
        self.count += 1

    def summary(self) -> dict:
        """{count, window, p50, p95, p99, max} in milliseconds (None without a request)."""
        values = sorted(self.samples)
        if not values:
            return {"count": self.count, "window": 0, "p50": None, "p95": None, "p99": None, "max": None}

        def pct(p: float) -> float:
            return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))] * 1000

        return {"count": self.count, "window": len(values), "p50": pct(50), "p95": pct(95), "p99": pct(99),
                "max": values[-1] * 1000}


def _stamp(*paths: Path) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class PrivacyView:
    """The page's ledger numbers for one store, recomputed only when its ledger changes."""

    def __init__(self, store_dir: Path, state_dir: Path, accountant: str = "prv") -> None:
        self.store_dir, self.state_dir, self.accountant = Path(store_dir), Path(state_dir), accountant
        self._lock = threading.Lock()
        self._cached: tuple[tuple, dict] | None = None

    def stamp(self) -> tuple:
        return _stamp(ledger_path(self.state_dir), head_path(self.state_dir), self.store_dir / "store.json")

    def ledger(self) -> dict:
        """``{"report": privacy_report(...) or None, "error": why not, "curve": [ε after each
        round shown], "stamp"}``."""
        from client.state.privacy_report import privacy_report
        from common.data.storefiles import DataError
        from common.privacy import accountant as privacy
        from common.privacy.ledger import LedgerError

        stamp = self.stamp()
        with self._lock:
            if self._cached is not None and self._cached[0] == stamp:
                return self._cached[1]
            try:
                report = privacy_report(self.store_dir, self.state_dir, accountant=self.accountant)
                error = None
            except (LedgerError, DataError) as exc:
                report, error = None, str(exc)
            curve: list[float | None] = []
            if report is not None:
                events = report["events"]
                history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events]
                n = len(history)
                shown = set(range(n)) if n <= CURVE_POINTS else \
                    {round(i * (n - 1) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)}
                curve = [privacy.epsilon(history[:i + 1], report["delta"], self.accountant) if i in shown else None
                         for i in range(n)]
            value = {"report": report, "error": error, "curve": curve, "stamp": stamp}
            self._cached = (stamp, value)
            return value


def page_data(serving: "StoreServing", view: PrivacyView, latency: Latency) -> dict:
    """Everything the privacy page shows, as plain values (the browser tests compare them)."""
    state = serving.state_dir
    entries = reply_log.read_log(state)
    signers = {e["run_id"]: e["signed_by"] for e in entries if e.get("signed_by")}
    try:
        prev = json.loads((Path(state) / PREV_INFO_FILE).read_text())
    except (OSError, ValueError):
        prev = None
    return {"store_id": serving.store_id, "ledger": view.ledger(), "model": read_info(state), "previous_model": prev,
            "model_in_use": serving.model_info(), "model_error": serving.model_error, "layer": serving.layer_info(),
            "layer_note": serving.layer_error, "replies": entries, "signers": signers,
            "validation": getattr(serving, "validation", None), "latency": latency.summary(),
            "state_dir": str(state), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _values_text(kind: str, values: dict) -> str:
    shown = reply_log.listed_values(kind, values)  # the wire lists again: nothing else is ever shown
    return ", ".join(f"{k}={format(v, '.6g') if isinstance(v, float) else v}" for k, v in shown.items()) or "–"


def privacy_page(data: dict, *, chart_url: str | None = "/privacy/epsilon.svg") -> str:
    """The page's HTML (see the module docstring)."""
    ledger, report = data["ledger"], data["ledger"]["report"]
    body = [tag("h1", f"Privacy at store {data['store_id']}"),
            tag("p", f"Read from {data['state_dir']} at {data['at']}. Nothing on this page leaves the store; "
                "the server knows only what “What left the store” lists.", class_="note")]
    body.append(tag("h2", "Privacy budget"))
    if report is None:
        body.append(tag("p", f"The ledger cannot be read, so this store trains nothing until it is repaired: "
                        f"{ledger['error']}", class_="bad", data_testid="ledger-error"))
    else:
        left = report["budget"] - report["epsilon"]
        cards = [("ε spent", num(report["epsilon"])), ("ε budget", num(report["budget"])), ("ε left", num(left)),
                 ("δ", f"{report['delta']:.0e}"), ("accountant", report["accountant"]),
                 ("rounds left at the last settings", report["remaining_rounds"]),
                 ("published size", report["published_size"] if report["published_size"] is not None else "none")]
        body.append(Raw('<div class="cards" data-testid="budget">' + "".join(
            f'<div class="card">{esc(k)}<b data-key="{esc(k)}">{esc(v)}</b></div>' for k, v in cards) + "</div>"))
        if report["reservations"]:
            body.append(tag("p", f"ε {num(report['epsilon_events'])} without the open reservations below "
                            "(they count as spent until their run commits or releases them).", class_="warn"))
        if chart_url and report["events"]:
            body.append(Raw(f'<img class="chart" alt="ε over the ledger\'s rounds against the budget" '
                            f'src="{esc(chart_url)}">'))
        body.append(tag("h2", "The ledger: every round this store trained, and every explore release (round 0)"))
        rows = []
        for i, (e, eps) in enumerate(zip(report["events"], ledger["curve"] or [None] * len(report["events"])), 1):
            rows.append([i, e["run_id"], e["round"], e["at"], num(e["noise_multiplier"]), num(e["sample_rate"]),
                         e["steps"], num(e["clip_norm"], 2), f"{e['delta']:.0e}", num(eps),
                         data["signers"].get(str(e["run_id"]), "not recorded")])
        body.append(Raw('<div class="scroll">') + table(
            ["#", "run", "round", "at (UTC)", "σ", "q", "steps", "clip C", "δ", "ε after it (today's δ)",
             "signed by (operator key)"], rows, test_id="events") + Raw("</div>"))
        body.append(tag("p", f"{len(report['events'])} events in {len(report['runs'])} runs · {report['ledger']}",
                        class_="note"))
        body.append(tag("h2", "Open reservations"))
        if report["reservations"]:
            body.append(table(["id", "run", "round", "σ", "q", "steps", "since", "ε alone"],
                              [[r["id"], r["run_id"], r["round"], num(r["noise_multiplier"]), num(r["sample_rate"]),
                                r["steps"], r["at"], num(r["epsilon"])] for r in report["reservations"]],
                              test_id="reservations"))
            body.append(tag("p", "A reservation whose run crashed stays spent until you clear it: storefed privacy "
                            "--store-dir DIR --clear-reservation ID", class_="note"))
        else:
            body.append(tag("p", "None.", class_="note", data_testid="reservations-none"))

    body.append(tag("h2", "The model this store keeps"))
    model = data["model"]
    if model is None:
        body.append(tag("p", "No model has been delivered to this store yet; it answers with its best sellers.",
                        class_="note", data_testid="model-none"))
    else:
        layer = data["layer"]
        body.append(table(["run", "delivered in Flower run", "round", "hash", "ε at delivery", "final", "received at",
                           "in use by serve"],
                          [[model.get("run_id"), model.get("delivered_in_run", "–"), model.get("round"),
                            model.get("hash"), num(model.get("epsilon")), "yes" if model.get("final") else "no",
                            model.get("received_at", "–"),
                            "yes" if (data["model_in_use"] or {}).get("hash") == model.get("hash") else
                            f"no ({data['model_error'] or 'loading'})"]], test_id="model"))
        body.append(table(["store-local layer", "fitted by", "fitted at", "members it was fitted on", "note"],
                          [["in use" if layer else "none", (layer or {}).get("fitted_by", "–"),
                            (layer or {}).get("fitted_at", "–"), (layer or {}).get("fitted_on", "–"),
                            data["layer_note"] or ""]], test_id="layer"))
        prev = data["previous_model"]
        if prev:
            body.append(tag("p", f"Previous model (for a rollback): run {prev.get('run_id')}, round {prev.get('round')}, "
                            f"hash {prev.get('hash')}.", class_="note"))

    replies = data["replies"]
    refused = reply_log.refusals(replies)[-REFUSALS_SHOWN:]
    body.append(tag("h2", "Declines and refusals"))
    if refused:
        body.append(Raw('<div class="scroll">') + table(
            ["at (UTC)", "run", "round", "message", "what", "reason"],
            [[e["at"], e["run_id"], e["round"], e["message"], e["outcome"], e.get("reason") or "–"]
             for e in reversed(refused)], test_id="refusals") + Raw("</div>"))
    else:
        body.append(tag("p", "None recorded.", class_="note", data_testid="refusals-none"))

    body.append(tag("h2", "What left the store"))
    body.append(tag("p", "Each reply this store sent, with the values common/exchange/wire.py allows and nothing "
                    "else; a model, update or explore release is listed by its size only.", class_="note"))
    sent = [e for e in replies if e["outcome"] == "sent"][-REPLIES_SHOWN:]
    if sent:
        body.append(Raw('<div class="scroll">') + table(
            ["at (UTC)", "run", "round", "message", "model or update", "values"],
            [[e["at"], e["run_id"], e["round"], e["message"],
              f"{e['arrays']['tensors']} tensors, {e['arrays']['bytes']} bytes" if e.get("arrays") else "none",
              _values_text(e["message"], e.get("values") or {})] for e in reversed(sent)], test_id="sent")
            + Raw("</div>"))
    else:
        body.append(tag("p", "Nothing recorded yet (the reply log starts with this version).", class_="note"))

    body.append(tag("h2", "The last validation of the store's files"))
    validation = data["validation"]
    if validation:
        vrows = []
        for name, rep in validation["files"].items():
            vrows.append([name, rep["rows_in"], rep["accepted"], sum(rep["excluded"].values()),
                          ", ".join(f"{k} {v}" for k, v in rep["excluded"].items()) or "–",
                          sum(rep["quarantined"].values()),
                          ", ".join(f"{k} {v}" for k, v in rep["quarantined"].items()) or "–"])
        body.append(table(["file", "rows", "accepted", "excluded", "why excluded", "quarantined", "why quarantined"],
                          vrows, test_id="validation"))
        body.append(tag("p", f"By {validation['by']} at {validation['at']}; quarantined rows are in "
                        f"{data['state_dir']}/quarantine with their reasons.", class_="note"))
    body.append(tag("h2", "Serving latency"))
    lat = data["latency"]
    body.append(table(["API requests answered", "of the last", "p50 ms", "p95 ms", "p99 ms", "max ms"],
                      [[lat["count"], lat["window"], num(lat["p50"], 2), num(lat["p95"], 2), num(lat["p99"], 2),
                        num(lat["max"], 2)]], test_id="latency"))
    body.append(Raw('<form method="post" action="/signout"><button type="submit">Sign out</button></form>'))
    nav = (("/privacy", "privacy"), ("/docs", "API docs"))
    return page(f"storefed · store {data['store_id']} · privacy", "".join(str(b) for b in body), nav=nav,
                brand=f"storefed serve · store {data['store_id']}")


def epsilon_chart(data: dict) -> str:
    """ε after each round of the ledger (a step), against the store's budget."""
    from common.view import charts

    report = data["ledger"]["report"]
    points = [(0, 0.0)] + [(i, e) for i, e in enumerate(data["ledger"]["curve"], 1) if e is not None]
    return charts.line_chart({"ε spent": ([p[0] for p in points], [p[1] for p in points])},
                             title=f"ε spent at store {data['store_id']}", xlabel="rounds trained (ledger order)",
                             ylabel="ε", hline=report["budget"] if report else None,
                             hline_label=f"budget {report['budget']:g}" if report else "", step=True, integer_x=True)


def signin_page(store_id: str, message: str = "") -> str:
    """The sign-in form: the store's key, once, for a cookie that opens its pages."""
    body = [tag("h1", f"Sign in to store {store_id}"),
            tag("p", "The store's pages (privacy, API docs) open with the store's key, the same bearer key its API "
                "takes. The key is checked here and never stored in the browser: a session cookie stands for it.",
                class_="note")]
    if message:
        body.append(tag("p", message, class_="bad", data_testid="signin-error"))
    body.append(Raw('<form class="signin" method="post" action="/signin">'
                    '<label for="key">Store key</label>'
                    '<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>'
                    '<button type="submit">Sign in</button></form>'))
    return page(f"storefed · store {store_id} · sign in", "".join(str(b) for b in body),
                brand=f"storefed serve · store {store_id}")

