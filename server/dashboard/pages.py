"""The operator's dashboard as HTML: the runs list, one run, one benchmark report. Pure.

Every number is in a table (readable without JavaScript, and what the browser tests read);
the charts are SVG images the app draws from the same numbers (:mod:`server.dashboard.app`).
Numbers are written by :func:`common.view.html.num` (4 decimals for a quality metric or an
ε), so a page can be checked against ``results.json`` by formatting the file's values alike.
"""

from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import quote

from common.view.html import Raw, esc, link, num, page, table, tag
from server.dashboard.runs import Summary
from server.report import SUMMARY_KEYS

NAV = (("/", "runs"),)
OUTCOMES = ("trained", "declined", "refused", "failed", "rejected")
ROWS_SHOWN = 2000  # reasons listed on a run's page at most (results.json holds them all)


def _eps_range(s: Summary) -> str:
    if s.epsilon_min is None:
        return "–" if s.dp is not False else "∞ (no DP)"
    if s.kind == "benchmark":
        return f"{s.epsilon_min:g} – {s.epsilon_max:g} (targets)"
    return f"{num(s.epsilon_min, 2)} – {num(s.epsilon_max, 2)}"


def runs_page(rows: list[Summary], roots: Iterable[str], took_ms: float | None = None) -> str:
    """The list of runs: when, who signed, strategy, stores, rounds, status, ε range."""
    def row(s: Summary) -> list:
        name = link(f"/runs/{s.key}", s.name) if s.kind in ("run", "benchmark", "report") and not s.damaged else s.name
        status = tag("span", s.status, class_="bad" if s.damaged or s.status.startswith("stopped") else
                     "warn" if s.kind == "incomplete" or "refused or failed" in s.status else "ok")
        rounds = "–" if s.rounds is None else (f"{s.rounds_done}/{s.rounds}" if s.rounds_done != s.rounds else s.rounds)
        return [name, s.kind, s.when or "–", s.signed_by or ("unsigned" if s.kind == "run" and not s.damaged else "–"),
                s.strategy or "–", "–" if s.stores is None else s.stores, rounds, status, _eps_range(s)]

    body = [tag("h1", "Runs"),
            tag("p", f"{len(rows)} runs and reports under " + ", ".join(roots) +
                ". Newest first; a run's page has its rounds, its stores and its model.", class_="note"),
            table(["run", "kind", "when (UTC)", "signed by (operator key)", "strategy", "stores", "rounds", "status",
                   "ε per store"], [row(s) for s in rows], test_id="runs")]
    if took_ms is not None:
        body.append(tag("p", f"listed in {took_ms:.0f} ms", class_="muted"))
    return page("storefed · runs", "".join(body), nav=NAV, brand="storefed dashboard")


def error_page(title: str, message: str) -> str:
    """A page that says, in one line, what could not be shown."""
    return page(f"storefed · {title}", str(tag("h1", title)) + str(tag("p", message, class_="bad")), nav=NAV,
                brand="storefed dashboard")


# --- one run ------------------------------------------------------------------------------

def store_rounds(results: dict) -> tuple[list[str], list[int], dict[tuple[str, int], tuple[str, str]]]:
    """(stores, rounds, {(store, round): (what it did, why)}) from a run's results: the
    per-round ``stores`` lists, decline reasons, and ``failures`` for refusals and failures
    (a run written before per-store outcomes were recorded has only the latter)."""
    cells: dict[tuple[str, int], tuple[str, str]] = {}
    rounds = [int(r["round"]) for r in results.get("per_round", [])]
    for r in results.get("per_round", []):
        rnd = int(r["round"])
        for what in OUTCOMES:
            for store in (r.get("stores") or {}).get(what, []):
                if what == "rejected" or (store, rnd) not in cells:
                    cells[(store, rnd)] = (what, "")
        for store, why in (r.get("declines") or {}).items():
            cells[(store, rnd)] = ("declined", str(why))
    for f in results.get("failures", []):
        if f.get("phase", "train") not in ("train", "validation"):
            continue
        store, rnd = str(f.get("store") or f"node-{f.get('node')}"), int(f.get("round", 0))
        why = str(f.get("reason", ""))
        what = "rejected" if f.get("phase") == "validation" else "refused" if why.startswith("refused: ") else "failed"
        cells[(store, rnd)] = (what, why.removeprefix("refused: ").removeprefix("rejected: "))
    stores = sorted(set(results.get("privacy", {})) | {s for s, _ in cells})
    return stores, rounds, cells


def _quality_rows(results: dict) -> list[list]:
    rows = [["served model (with each store's local layer)", *(num(results["model"].get(k)) for k in SUMMARY_KEYS)],
            ["global model alone", *(num(results["global_model"].get(k)) for k in SUMMARY_KEYS)]]
    for name, metrics in results.get("baselines", {}).items():
        rows.append([f"baseline {name}", *(num(metrics.get(k)) for k in SUMMARY_KEYS)])
    return rows


def _round_rows(results: dict) -> list[list]:
    rows = []
    for r in results.get("per_round", []):
        q = r.get("quality") or {}
        rows.append([r["round"], r.get("participated", 0), r.get("declined", 0), r.get("failed", 0),
                     r.get("rejected", 0), num(q.get("served", r.get("ndcg@10"))), num(q.get("global_model")),
                     num(q.get("store_pop")), num(q.get("p_topfreq")), num(r.get("max_epsilon")),
                     num(r.get("train_loss"), 3), "–" if r.get("bytes_per_store") is None else r["bytes_per_store"],
                     num(r.get("seconds"), 1) + (" (skipped)" if r.get("skipped") else "")])
    return rows


def run_page(summary: Summary, results: dict, charts: dict[str, str]) -> str:
    """One run: quality per round, per store and round what it did, ε per store against its
    budget, the final model and who keeps it. ``charts``: name → image path."""
    delivery = results.get("delivery") or {}
    kept = set(delivery.get("delivered", []))
    evaluated = any(r.get("ndcg@10") is not None for r in results.get("per_round", []))
    cards = [("stores", results.get("stores")), ("rounds", f"{len(results.get('per_round', []))} of {results.get('rounds')}"),
             ("strategy", results.get("strategy", "–")), ("DP", f"target ε {num(results.get('target_epsilon'), 2)}"
                                                          if results.get("dp", True) else "off (reference run)"),
             ("signed by", results.get("signed_by") or "unsigned"), ("finished", summary.when or "–"),
             ("time", f"{num(results.get('elapsed_s'), 1)} s")]
    body = [tag("h1", f"Run {results.get('run_id') or summary.name}"),
            tag("p", f"{summary.path} · status: {summary.status}", class_="note"),
            Raw('<div class="cards">' + "".join(f'<div class="card">{esc(k)}<b>{esc(v)}</b></div>' for k, v in cards)
                + "</div>")]
    body.append(tag("h2", "Quality of the final model"))
    if evaluated:
        body.append(table(["model", *SUMMARY_KEYS], _quality_rows(results), test_id="quality"))
        aud = results.get("audience") or {}
        if aud:
            body.append(table(["audience (goods find people)", "AUC", "recall@100"],
                              [["served model", num(aud.get("model", {}).get("auc")),
                                num(aud.get("model", {}).get("recall@100"))],
                               ["member popularity", num(aud.get("member_pop", {}).get("auc")),
                                num(aud.get("member_pop", {}).get("recall@100"))]], test_id="audience"))
    else:
        body.append(tag("p", "No store sent evaluation metrics in this run (a deployed store keeps them unless it "
                        "allows local metrics).", class_="note"))
    body.append(tag("h2", "Rounds"))
    if "quality" in charts:
        body.append(Raw(f'<img class="chart" alt="NDCG@10 per round" src="{esc(charts["quality"])}">'))
    body.append(table(["round", "trained", "declined", "failed/refused", "rejected", "served NDCG@10",
                       "global NDCG@10", "store_pop NDCG@10", "p_topfreq NDCG@10", "max ε", "train loss",
                       "bytes per store", "seconds"], _round_rows(results), test_id="rounds"))

    stores, rounds, cells = store_rounds(results)
    body.append(tag("h2", "Privacy spent per store"))
    if "epsilon" in charts:
        body.append(Raw(f'<img class="chart" alt="ε per store against its budget" src="{esc(charts["epsilon"])}">'))
    privacy = results.get("privacy", {})
    prow = []
    for store in stores:
        p = privacy.get(store) or {}
        eps, budget = p.get("epsilon"), p.get("budget")
        over = eps is not None and budget is not None and eps > budget + 1e-9
        prow.append([store, num(eps), num(budget), "–" if eps is None or budget is None else num(budget - eps),
                     f"{p['delta']:.0e}" if p.get("delta") is not None else "–", num(p.get("noise_multiplier")),
                     p.get("rounds_trained", "–"), p.get("declined_rounds", "–"), p.get("accountant") or "–",
                     "yes" if store in kept else "no",
                     tag("span", "over budget", class_="bad") if over else ""])
    body.append(Raw('<div class="scroll">') + table(
        ["store", "ε spent", "ε budget", "ε left", "δ", "σ", "rounds trained", "rounds declined", "accountant",
         "keeps the final model", ""], prow, test_id="privacy") + Raw("</div>"))

    body.append(tag("h2", "What each store did, round by round"))
    if not any("stores" in r for r in results.get("per_round", [])):
        body.append(tag("p", "This run's results predate per-store outcomes: only refusals and failures are known; "
                        "– is a round the store trained or was not asked.", class_="note"))
    mark = {"trained": "ok", "declined": "warn", "refused": "bad", "failed": "bad", "rejected": "bad"}
    grid = []
    for store in stores:
        row: list = [store]
        for rnd in rounds:
            what, why = cells.get((store, rnd), ("–", ""))
            row.append(Raw(f'<span class="{mark.get(what, "muted")}" title="{esc(why)}">{esc(what)}</span>'))
        grid.append(row)
    body.append(Raw('<div class="scroll">') + table(["store", *(f"round {r}" for r in rounds)], grid,
                                                    test_id="outcomes") + Raw("</div>"))
    reasons = [(rnd, store, what, why) for (store, rnd), (what, why) in sorted(cells.items(), key=lambda x: (x[0][1], x[0][0]))
               if why]
    if reasons:
        shown = reasons[:ROWS_SHOWN]
        body.append(tag("h3", "Why a store did not train"))
        body.append(Raw('<div class="scroll">') + table(["round", "store", "what", "reason"], shown, test_id="reasons")
                    + Raw("</div>"))
        if len(reasons) > len(shown):
            body.append(tag("p", f"{len(reasons) - len(shown)} more in results.json", class_="note"))
    evaluate_failures = [f for f in results.get("failures", []) if f.get("phase") == "evaluate"]
    if evaluate_failures:
        body.append(tag("h3", "Evaluation failures"))
        body.append(table(["round", "store", "reason"], [[f.get("round"), f.get("store"), f.get("reason")]
                                                         for f in evaluate_failures[:ROWS_SHOWN]]))

    body.append(tag("h2", "The final model"))
    if delivery:
        body.append(table(["hash", "round", "kept by", "did not take it"],
                          [[delivery.get("hash"), delivery.get("round"), f"{len(kept)} stores",
                            len(delivery.get("failed", []))]], test_id="delivery"))
        body.append(tag("p", "Kept by: " + (", ".join(sorted(kept)) or "no store"), class_="note",
                        data_testid="kept-by"))
        if delivery.get("failed"):
            body.append(table(["store (or node)", "reason"],
                              [[f.get("store") or f"node-{f.get('node')}", f.get("reason")]
                               for f in delivery["failed"][:ROWS_SHOWN]], test_id="delivery-failed"))
    else:
        body.append(tag("p", "No model was delivered (the run was interrupted; resume it to finish).", class_="note"))
    member = results.get("member_privacy")
    if member:
        body.append(tag("h2", "Each member's ε over every store they trained at (simulation only)"))
        body.append(table(["max ε of a member", "budget", "members at several stores",
                           "of them trained at several stores"],
                          [[num(member.get("max_epsilon")), num(member.get("budget")),
                            member.get("members_at_several_stores", "–"),
                            member.get("members_trained_at_several_stores", "–")]], test_id="member-privacy"))
    return page(f"storefed · run {summary.name}", "".join(str(b) for b in body), nav=NAV, brand="storefed dashboard")


# --- a benchmark's report -----------------------------------------------------------------

def _eps_of(method: str) -> float | None:
    m = re.fullmatch(r"fed_dp_eps([0-9.]+)(_global)?", method)
    return float(m.group(1)) if m else None


def explore_rows(results: dict) -> list[list]:
    """Explore NDCG@10 (items new to the member) and all-items NDCG@10 against ε: the served
    model and the global model at each ε, then the references without a privacy target."""
    methods = results["methods"]

    def metric(name: str, view: str, key: str = "ndcg@10"):
        return ((methods.get(name) or {}).get("member_weighted") or {}).get(view, {}).get(key)

    rows = []
    for eps in sorted({e for e in map(_eps_of, methods) if e is not None}, reverse=True):
        served, alone = f"fed_dp_eps{eps:g}", f"fed_dp_eps{eps:g}_global"
        rows.append([f"{eps:g}", num(metric(served, "explore")), num(metric(alone, "explore")),
                     num(metric(served, "explore", "recall@10")), num(metric(served, "all")), num(metric(alone, "all"))])
    for ref in ("fed_nodp", "centralized", "local_dp_eps8", "p_topfreq", "store_pop"):
        if ref in methods:
            rows.append([f"{ref} (reference)", num(metric(ref, "explore")), num(metric(f"{ref}_global", "explore")),
                         num(metric(ref, "explore", "recall@10")), num(metric(ref, "all")),
                         num(metric(f"{ref}_global", "all"))])
    return rows


def audience_rows(results: dict) -> list[list]:
    """The campaign view: how well each method ranks a store's members for its best sellers."""
    rows = []
    for name, method in results["methods"].items():
        aud = (method or {}).get("audience")
        if aud and (aud.get("auc") or aud.get("recall@100")):
            rows.append([name, num(aud.get("auc")), num(aud.get("recall@100"))])
    return rows


_TABLE_SEP = re.compile(r"^\|?\s*:?-{3,}")
_BULLET = re.compile(r"^\s*[-*] ")


def _inline(text: str, image_url) -> str:
    """Markdown's inline marks the reports use: images, `code`, **bold**."""
    out, pos = [], 0
    for m in re.finditer(r"!\[([^\]]*)\]\(([^)\s]+)\)|`([^`]+)`|\*\*([^*]+)\*\*", text):
        out.append(esc(text[pos:m.start()]))
        if m.group(2) is not None:
            src = image_url(m.group(2))
            out.append(f'<img class="chart" alt="{esc(m.group(1))}" src="{esc(src)}">' if src else esc(m.group(0)))
        elif m.group(3) is not None:
            out.append(f"<code>{esc(m.group(3))}</code>")
        else:
            out.append(f"<b>{esc(m.group(4))}</b>")
        pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def markdown_html(text: str, image_url) -> Raw:
    """The subset of Markdown the benchmark reports are written in (headings, paragraphs,
    pipe tables, lists, images, code, bold) as HTML; everything else is text.
    ``image_url(src)`` maps an image's path to its URL (None: not shown)."""
    html, para, lines, i = [], [], text.splitlines(), 0

    def flush() -> None:
        if para:
            html.append(f"<p>{_inline(' '.join(para), image_url)}</p>")
            para.clear()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)  # the report's # is the page's h2
            html.append(f"<h{level}>{_inline(line.lstrip('#').strip(), image_url)}</h{level}>")
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1].strip()):
            flush()
            head = cells(line)
            i += 2
            body = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                body.append(cells(lines[i]))
                i += 1
            html.append('<div class="scroll"><table><thead><tr>' + "".join(f"<th>{_inline(h, image_url)}</th>" for h in head)
                        + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{_inline(c, image_url)}</td>" for c in r)
                                                           + "</tr>" for r in body) + "</tbody></table></div>")
            continue
        elif _BULLET.match(line):
            flush()
            items = []
            while i < len(lines) and _BULLET.match(lines[i]):
                item = _inline(_BULLET.sub("", lines[i]), image_url)
                items.append(f"<li>{item}</li>")
                i += 1
            html.append("<ul>" + "".join(items) + "</ul>")
            continue
        else:
            para.append(line.strip())
        i += 1
    flush()
    return Raw("".join(html))


def benchmark_page(summary: Summary, results: dict | None, report: str | None, charts: dict[str, str],
                   files_url: str) -> str:
    """A benchmark's results: explore NDCG@10 against ε first, then the campaign (audience)
    table, then the report as written (its quality tables and plots)."""
    body = [tag("h1", f"Benchmark {summary.name}"), tag("p", summary.path, class_="note")]
    if results is not None:
        s = results.get("settings", {})
        body.append(tag("p", f"{s.get('stores', '–')} stores · {s.get('rounds', '–')} rounds · "
                        f"{s.get('train_members', '–')} training members · catalog {s.get('catalog', '–')} items · "
                        f"δ ≤ {s.get('delta', '–')} · accountant {s.get('accountant', '–')} · "
                        f"data {s.get('dataset') or ('generated, seed ' + str(s.get('seed')))}", class_="note"))
        body.append(tag("h2", "Explore NDCG@10 against ε (items new to the member)"))
        if "explore" in charts:
            body.append(Raw(f'<img class="chart" alt="explore NDCG@10 against ε" src="{esc(charts["explore"])}">'))
        body.append(table(["ε", "explore NDCG@10 (served)", "explore NDCG@10 (global alone)", "explore recall@10",
                           "NDCG@10 all items (served)", "NDCG@10 all items (global alone)"], explore_rows(results),
                          test_id="explore"))
        aud = audience_rows(results)
        if aud:
            body.append(tag("h2", "Campaigns: ranking a store's members for its best sellers"))
            body.append(table(["method", "audience AUC", "audience recall@100"], aud, test_id="campaign"))
        targets = results.get("targets") or {}
        if targets:
            body.append(tag("h2", "Targets"))
            body.append(table(["target", "value", "threshold", "result"],
                              [[t.get("description", k), num(t.get("value")), num(t.get("threshold")),
                                tag("span", "PASS" if t.get("pass") else "FAIL", class_="ok" if t.get("pass") else "bad")]
                               for k, t in targets.items()], test_id="targets"))
    if report is not None:
        body.append(Raw('<section class="report">'))
        body.append(markdown_html(report, lambda src: f"{files_url}/{quote(src)}"
                                  if re.fullmatch(r"[\w.-]+\.(png|svg)", src) else None))
        body.append(Raw("</section>"))
    return page(f"storefed · benchmark {summary.name}", "".join(str(b) for b in body), nav=NAV,
                brand="storefed dashboard")
