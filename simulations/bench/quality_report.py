"""The quality benchmark's arithmetic and its report: means, spread, targets, Markdown. Pure.

Input is one record per (method, store), as :mod:`simulations.bench.quality` measures them:
``{"store", "train_members", "all": {...}, "explore": {...}, "audience": {...}}`` where
``all``/``explore`` hold the list metrics of :func:`common.evaluation.evaluation.list_report` (with
their ``members`` count) and ``audience`` the "goods find people" figures.
"""

from __future__ import annotations

import numpy as np

BASELINE_METHODS = ("global_pop", "store_pop", "p_topfreq")
EPSILONS = (0.3, 1.0, 4.0, 8.0)
NON_PRIVATE = ("centralized", "fed_nodp", "tifu_knn", "p_topfreq")  # "the best non-private method"
SMALL_STORE = 200  # training members: a "small store" below this
HEADLINE = "ndcg@10"
TABLE_KEYS = ("ndcg@10", "recall@10", "hit@10", "map@10", "ndcg@20", "recall@20", "coverage@10", "diversity@10")
# (target id, method, share of the centralized model's NDCG@10 it must reach)
RATIO_TARGETS = (("fed_nodp_vs_centralized", "fed_nodp", 0.95), ("fed_dp_eps8_vs_centralized", "fed_dp_eps8", 0.90),
                 ("fed_dp_eps4_vs_centralized", "fed_dp_eps4", 0.85), ("fed_dp_eps1_vs_centralized", "fed_dp_eps1", 0.70))


def _weighted(values: list[float], weights: list[float]) -> float:
    w = np.asarray(weights, dtype=float)
    return float(np.dot(values, w) / w.sum()) if w.sum() > 0 else 0.0


def summarize(records: list[dict]) -> dict:
    """Member-weighted and store-weighted means of every metric, and the per-store spread.

    Member-weighted: each store counts with the members it evaluated (for "explore", the
    members with a new item in their test basket). Store-weighted: each store with at least
    one evaluated member counts once. Audience means weigh stores by training members.
    """
    out: dict = {"member_weighted": {}, "store_weighted": {}}
    for view in ("all", "explore"):
        rows = [r for r in records if r[view]["members"] > 0]
        keys = [k for k in (rows[0][view] if rows else {}) if k != "members"]
        weights = [r[view]["members"] for r in rows]
        out["member_weighted"][view] = {k: _weighted([r[view][k] for r in rows], weights) for k in keys}
        out["member_weighted"][view]["members"] = int(sum(weights))
        out["store_weighted"][view] = {k: float(np.mean([r[view][k] for r in rows])) if rows else 0.0 for k in keys}
        out["store_weighted"][view]["stores"] = len(rows)
    ndcg = [r["all"][HEADLINE] for r in records if r["all"]["members"] > 0]
    out["spread"] = _spread(ndcg)
    out["slices"] = summarize_slices(records)
    return {**out, **summarize_audience(records)}


def summarize_slices(records: list[dict]) -> dict:
    """Member-weighted cold-member metrics, new-item recall and share, and small stores' means."""
    out: dict = {}
    cold = [r for r in records if r.get("cold", {}).get("members", 0) > 0]
    w = [r["cold"]["members"] for r in cold]
    out["cold"] = {k: _weighted([r["cold"][k] for r in cold], w) for k in ("ndcg@10", "recall@10")}
    out["cold"]["members"] = int(sum(w))
    new = [r for r in records if r.get("new_items", {}).get("items", 0) > 0]
    found = sum(r["new_items"]["recall@20"] * r["new_items"]["items"] for r in new)
    total = sum(r["new_items"]["items"] for r in new)
    share_w = [r["new_items"]["share"] for r in records if "new_items" in r]
    out["new_items"] = {"recall@20": found / total if total else 0.0,
                        "share": float(np.mean(share_w)) if share_w else 0.0, "items": int(total)}
    small = [r for r in records if r["train_members"] < SMALL_STORE and r["all"]["members"] > 0]
    ws = [r["all"]["members"] for r in small]
    out["small_stores"] = {"ndcg@10": _weighted([r["all"][HEADLINE] for r in small], ws),
                           "explore ndcg@10": _weighted([r["explore"][HEADLINE] for r in small],
                                                        [r["explore"]["members"] for r in small]),
                           "stores": len(small), "members": int(sum(ws))}
    return out


def summarize_audience(records: list[dict]) -> dict:
    """Audience means over the stores that had best sellers to rank members for: weighted by
    training members (``audience``) and one vote per store (``audience_store_weighted``)."""
    aud = [r for r in records if r.get("audience", {}).get("items", 0) > 0]
    return {"audience": {k: _weighted([r["audience"][k] for r in aud], [r["train_members"] for r in aud])
                         for k in ("auc", "recall@100")},
            "audience_store_weighted": {k: float(np.mean([r["audience"][k] for r in aud])) if aud else 0.0
                                        for k in ("auc", "recall@100")}}


def _spread(values: list[float]) -> dict:
    """min, quartiles and max of a per-store metric (zeros when there is no store)."""
    if not values:
        return {q: 0.0 for q in ("min", "p25", "median", "p75", "max")}
    v = np.asarray(values, dtype=float)
    return {"min": float(v.min()), "p25": float(np.percentile(v, 25)), "median": float(np.median(v)),
            "p75": float(np.percentile(v, 75)), "max": float(v.max())}


def _target(description: str, value: float, threshold: float, passed: bool) -> dict:
    return {"description": description, "value": float(value), "threshold": float(threshold), "pass": bool(passed)}


def evaluate_targets(methods: dict) -> dict:
    """The issue's targets with their values and PASS/FAIL, keyed by a stable id.

    ``methods[name]`` is the :func:`summarize` output plus ``per_store`` records. Learned
    methods are the served models (the global model with each store's local layer); a
    target whose methods were not run is left out.
    """
    lists = {m: s for m, s in methods.items() if "member_weighted" in s}  # member_pop ranks members only
    mean = {m: s["member_weighted"]["all"][HEADLINE] for m, s in lists.items()}
    explore = {m: s["member_weighted"]["explore"][HEADLINE] for m, s in lists.items()}
    targets: dict = {}

    def add(key, description, value, threshold, passed):
        targets[key] = _target(description, value, threshold, passed)

    best_name = max((m for m in NON_PRIVATE if m in mean), key=lambda m: mean[m], default=None)
    if best_name and "fed_dp_eps8" in mean:
        ratio = mean["fed_dp_eps8"] / mean[best_name] if mean[best_name] > 0 else 0.0
        add("eps8_all_vs_best_non_private", f"served ε = 8 NDCG@10 (all) ≥ 97 % of the best non-private "
            f"method ({best_name})", ratio, 0.97, ratio >= 0.97)
    if "fed_dp_eps8" in explore and "store_pop" in explore:
        ratio = explore["fed_dp_eps8"] / explore["store_pop"] if explore["store_pop"] > 0 else 0.0
        add("eps8_explore_vs_store_pop", "served ε = 8 explore NDCG@10 ≥ 1.5 × store popularity's", ratio, 1.5,
            ratio >= 1.5)
    for eps in ("1", "0.3"):
        name = f"fed_dp_eps{eps}"
        if name in mean and "p_topfreq" in mean:
            add(f"eps{eps}_all_vs_p_topfreq", f"served ε = {eps} NDCG@10 (all) ≥ P-TopFreq's", mean[name],
                mean["p_topfreq"], mean[name] >= mean["p_topfreq"])
    if "fed_dp_eps1" in explore and "store_pop" in explore:
        add("eps1_explore_vs_store_pop", "served ε = 1 explore NDCG@10 > store popularity's", explore["fed_dp_eps1"],
            explore["store_pop"], explore["fed_dp_eps1"] > explore["store_pop"])
    small = {m: lists[m]["slices"]["small_stores"] for m in ("fed_dp_eps8", "store_pop", "p_topfreq") if m in lists}
    if len(small) == 3 and small["fed_dp_eps8"]["stores"] > 0:
        for base in ("store_pop", "p_topfreq"):
            add(f"eps8_small_stores_vs_{base}", f"served ε = 8 NDCG@10 on stores under {SMALL_STORE} members ≥ "
                f"{base}'s", small["fed_dp_eps8"]["ndcg@10"], small[base]["ndcg@10"],
                small["fed_dp_eps8"]["ndcg@10"] >= small[base]["ndcg@10"])
    if "fed_dp_eps8" in lists and "store_pop" in lists and lists["fed_dp_eps8"]["slices"]["cold"]["members"] > 0:
        a, b = lists["fed_dp_eps8"]["slices"]["cold"]["ndcg@10"], lists["store_pop"]["slices"]["cold"]["ndcg@10"]
        add("eps8_cold_members_vs_store_pop", "served ε = 8 NDCG@10 on cold members (≤ 2 baskets) > store "
            "popularity's", a, b, a > b)
    if "fed_dp_eps8" in lists and lists["fed_dp_eps8"]["slices"]["new_items"]["items"] > 0:
        share = lists["fed_dp_eps8"]["slices"]["new_items"]["share"]
        add("eps8_new_items_share", "served ε = 8: items new to a store get a non-zero share of recall "
            "(catalog-wide lists with the discovery places)", share, 0.0, share > 0)
        if "store_pop" in lists:
            base = lists["store_pop"]["slices"]["new_items"]["share"]
            add("eps8_new_items_vs_store_pop", "served ε = 8: items new to a store, share of recall ≥ store "
                "popularity's (same lists)", share, base, share >= base)
    if "centralized" in mean:
        for other in ("fed_nodp", "p_topfreq"):
            if other in mean:
                add(f"centralized_vs_{other}", f"centralized (the upper reference) NDCG@10 ≥ {other}'s",
                    mean["centralized"], mean[other], mean["centralized"] >= mean[other])
    central = mean.get("centralized", 0.0)
    for key, method, share in RATIO_TARGETS:
        if method in mean and "centralized" in mean:
            ratio = mean[method] / central if central > 0 else 0.0
            add(key, f"{method} NDCG@10 ≥ {share:.0%} of centralized", ratio, share, ratio >= share)
    if "fed_dp_eps8" in methods and "local_dp_eps8" in methods:
        diff = median_store_difference(methods["fed_dp_eps8"]["per_store"], methods["local_dp_eps8"]["per_store"])
        add("fed_dp_eps8_beats_local_on_median_store",
            "fed_dp_eps8 beats local-only on the median store (median of per-store NDCG@10 differences > 0)",
            diff, 0.0, diff > 0)
    # Issue 24: the DP global model alone against the same design without DP, and served
    # against a store alone, on explore (what federation is for).
    base = explore.get("fed_nodp_global", 0.0)
    for eps, share in (("8", 0.9), ("1", 0.6)):
        name = f"fed_dp_eps{eps}_global"
        if name in explore and "fed_nodp_global" in explore:
            ratio = explore[name] / base if base > 0 else 0.0
            add(f"eps{eps}_global_explore_vs_nodp", f"DP ε = {eps} global model alone, explore NDCG@10 ≥ "
                f"{share:.0%} of the non-private federated global model's", ratio, share, ratio >= share)
    if "fed_dp_eps0.3_global" in explore and "store_pop" in explore:
        add("eps0.3_global_explore_vs_store_pop", "DP ε = 0.3 global model alone, explore NDCG@10 > store "
            "popularity's", explore["fed_dp_eps0.3_global"], explore["store_pop"],
            explore["fed_dp_eps0.3_global"] > explore["store_pop"])
    if "fed_dp_eps8" in methods and "local_dp_eps8" in methods:
        gain = median_store_gain(methods["fed_dp_eps8"]["per_store"], methods["local_dp_eps8"]["per_store"], "explore")
        add("eps8_served_explore_vs_local_median_store", "served ε = 8 explore NDCG@10 against local-only's, "
            "median store: ≥ +15 %", gain, 0.15, gain >= 0.15)
    if "fed_dp_eps8" in methods and "member_pop" in methods:
        auc = methods["fed_dp_eps8"]["audience"]["auc"]
        base = methods["member_pop"]["audience"]["auc"]
        add("fed_dp_eps8_audience_vs_member_pop", "fed_dp_eps8 audience AUC > member popularity's", auc, base,
            auc > base)
    return targets


def median_store_gain(a: list[dict], b: list[dict], part: str = "all") -> float:
    """Median over the stores both evaluated of NDCG@10(a) / NDCG@10(b) − 1 on ``part``."""
    by_store = {r["store"]: r[part][HEADLINE] for r in b if r[part]["members"] > 0 and r[part][HEADLINE] > 0}
    gains = [r[part][HEADLINE] / by_store[r["store"]] - 1.0 for r in a if r["store"] in by_store]
    return float(np.median(gains)) if gains else 0.0


def median_store_difference(a: list[dict], b: list[dict]) -> float:
    """Median over the stores both evaluated of NDCG@10(a) − NDCG@10(b)."""
    by_store = {r["store"]: r["all"][HEADLINE] for r in b if r["all"]["members"] > 0}
    diffs = [r["all"][HEADLINE] - by_store[r["store"]] for r in a if r["store"] in by_store and r["all"]["members"] > 0]
    return float(np.median(diffs)) if diffs else 0.0


# How each real data set became a chain, for the report's "Data:" line.
DATA_MAPPING = {
    "instacart": "stores hashed from member ids, dates from day offsets, no categories",
    "completejourney": "its real stores (a household trains at the store of most of its baskets before the cut), "
                       "real timestamps, category and manufacturer from its product table",
}


def markdown_report(results: dict) -> str:
    """``report.md``: settings, the member-weighted table, store-weighted means, spread, targets."""
    s = results["settings"]
    methods = results["methods"]
    lines = ["# storefed quality benchmark", "",
             f"Chain: {s['data']} · {s['stores']} stores · {s['train_members']} training members · "
             f"{s['eval_members']} evaluated members · catalog {s['catalog']} items.",
             f"Seeds: chain {s['seed']}, training {s['seed']}. Rounds {s['rounds']} × local epochs "
             f"{s['local_epochs']}, batch {s['batch_size']}, lr {s['lr']}, clip {s['clip_norm']}, "
             f"δ ≤ {s['delta']:g} per store, accountant {s['accountant']}. Centralized: pooled, no DP, Adam lr "
             f"{s.get('central_lr', s['lr'])} for {s['central_epochs']} epochs, both chosen on a validation split cut "
             f"from the training period (early stopping). Learned methods are served with each store's local layer "
             f"(fitted at the store, on its training period, never sent); `<method>_global` rows are the model alone.  Federated without DP: Adam lr {s['lr']}; "
             f"with DP: {s.get('dp_optimizer', 'adam')} lr {s.get('dp_lr', s['lr'])}. Local-only: each store alone, DP at ε = 8, same rounds and settings. "
             f"Test: the last {s['test_days']} days; target = each member's first basket after the cut.",
             f"Run time {results['elapsed_s']:.0f} s{' (quick mode: a small chain, few rounds)' if s['quick'] else ''}.",
             *([f"Data: {s['provenance']} (`--dataset {s['dataset']}`); {DATA_MAPPING.get(s['dataset'], 'imported')} "
                "(simulations/README.md \"Quality\")."] if s.get("provenance") else []),
             "", "## Member-weighted means (all items)", ""]
    header = "| method | " + " | ".join(TABLE_KEYS) + " | explore ndcg@10 | explore recall@10 | audience AUC | audience recall@100 |"
    lines += [header, "|" + "---|" * (len(TABLE_KEYS) + 5)]
    for name, m in methods.items():
        if name == "member_pop":
            continue
        a, e, aud = m["member_weighted"]["all"], m["member_weighted"]["explore"], m.get("audience", {})
        cells = [f"{a[k]:.4f}" for k in TABLE_KEYS] + [f"{e['ndcg@10']:.4f}", f"{e['recall@10']:.4f}"]
        cells += [f"{aud['auc']:.4f}", f"{aud['recall@100']:.4f}"] if aud.get("auc") else ["–", "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "member_pop" in methods:
        aud = methods["member_pop"]["audience"]
        lines.append("| member_pop (audience only) | " + " | ".join("–" for _ in range(len(TABLE_KEYS) + 2))
                     + f" | {aud['auc']:.4f} | {aud['recall@100']:.4f} |")
    lines += ["", "`explore`: only items the member had not bought before the cut, judged on the members whose "
              "test basket holds one. Audience: for each store's 50 best sellers of the test period, the store's "
              "members ranked by score; AUC and recall of the buyers among the top 100.", "",
              "## Store-weighted means and per-store spread of NDCG@10 (all)", "",
              "| method | ndcg@10 | explore ndcg@10 | min | p25 | median | p75 | max |", "|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        if name == "member_pop":
            continue
        sw, sp = m["store_weighted"], m["spread"]
        lines.append(f"| {name} | {sw['all']['ndcg@10']:.4f} | {sw['explore']['ndcg@10']:.4f} | "
                     + " | ".join(f"{sp[q]:.4f}" for q in ("min", "p25", "median", "p75", "max")) + " |")
    lines += ["", "## Cold start and small stores", "",
              f"Cold members: at most 2 baskets before the cut. New items: target items the store had not sold "
              f"in the training period, found in catalog-wide top-20 lists whose last 2 places are kept for items the "
              f"store did not sell (the serving rule's discovery places; recall of them, and their share of all "
              f"items found). Small stores: under {SMALL_STORE} training members.", "",
              "| method | cold ndcg@10 | cold members | new-item recall@20 | new-item share | small-store ndcg@10 | "
              "small-store explore ndcg@10 | small stores |", "|---|---|---|---|---|---|---|---|"]
    small = sum(1 for n in s.get("store_sizes", []) if n < SMALL_STORE)
    if s.get("store_sizes") and small == len(s["store_sizes"]):
        lines[-2:-2] = [f"All {small} stores of this chain are small (training members: "
                        f"{', '.join(map(str, s['store_sizes']))}): the small-store columns are the whole chain's "
                        "member-weighted means.", ""]
    for name, m in methods.items():
        if "slices" not in m:
            continue
        c, n, sm = m["slices"]["cold"], m["slices"]["new_items"], m["slices"]["small_stores"]
        lines.append(f"| {name} | {c['ndcg@10']:.4f} | {c['members']} | {n['recall@20']:.4f} | {n['share']:.4f} | "
                     f"{sm['ndcg@10']:.4f} | {sm['explore ndcg@10']:.4f} | {sm['stores']} |")
    lines += ["", "## Targets", "", "| target | value | threshold | result |", "|---|---|---|---|"]
    for key, t in results["targets"].items():
        lines.append(f"| {t['description']} | {t['value']:.4f} | {t['threshold']:.4f} | "
                     f"{'PASS' if t['pass'] else 'FAIL'} |")
    lines += ["", "## Plots", "", "![NDCG@10 vs ε](ndcg_vs_epsilon.png)", "",
              "![NDCG@10 per round](ndcg_per_round.png)", "", "![per-store NDCG@10 vs store size](per_store_vs_size.png)", ""]
    return "\n".join(lines)
