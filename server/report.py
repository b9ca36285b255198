"""The run's results as the `storefed simulate --json` object, and its human summary. Pure."""

from __future__ import annotations

from common.exchange.wire import BASELINES

_FAILURES_SHOWN = 5
SUMMARY_KEYS = ("ndcg@10", "recall@10", "hit@10", "map@10", "ndcg@20", "recall@20")


def _finite(value):
    """JSON has no infinity: an unbounded ε (training without DP) is written as null."""
    return None if value is None or value == float("inf") else float(value)


def _pick(metrics: dict, prefix: str = "") -> dict:
    return {k: float(metrics.get(prefix + k, 0.0)) for k in SUMMARY_KEYS}


def round_quality(metrics: dict) -> dict:
    """NDCG@10 of one round's evaluation: the model the stores serve (with the store-local
    layer in the last round, else the global model), the global model alone and the baselines."""
    names = {"served": "", "global_model": "global_model.", **{b: f"{b}." for b in BASELINES}}
    return {name: float(metrics[prefix + "ndcg@10"]) for name, prefix in names.items()
            if prefix + "ndcg@10" in metrics}


def build_results(*, cfg: dict, stores: int, rounds: list[dict], privacy: dict, final_metrics: dict,
                  elapsed_s: float, failures: list[dict], out_dir: str, data_dir: str,
                  stopped: str | None = None) -> dict:
    """The results object; keys of the issue-3 contract first, extra keys after."""
    return {
        "stores": stores,
        "rounds": int(cfg["rounds"]),
        "seed": int(cfg["seed"]),
        # The model the stores serve (the global model with each store's local layer, when
        # the run fits it) and the global model alone, both member-weighted over the stores.
        "model": _pick(final_metrics),
        "global_model": _pick(final_metrics, "global_model."),
        "baselines": {b: _pick(final_metrics, f"{b}.") for b in BASELINES},
        "per_round": [
            {"round": r["round"], "participated": r.get("participated", 0),
             "ndcg@10": r.get("ndcg@10"), "failed": r.get("failed", 0),
             "declined": r.get("declined", 0), "rejected": r.get("rejected", 0),
             **({"skipped": True} if r.get("skipped") else {}),
             "max_epsilon": r.get("max_epsilon"),
             **({"train_loss": r["train_loss"]} if "train_loss" in r else {}),
             # Mean bytes one store sent in its train reply (wire format).
             **({"bytes_per_store": round(r["bytes_received"] / r["participated"])}
                if r.get("bytes_received") and r.get("participated") else {}),
             "seconds": r.get("seconds"),
             **({"window": r["window"]} if "window" in r else {}),
             # Which store did what this round (trained, declined, refused, failed; rejected:
             # trained, but the server set its update aside) and why each decline was one.
             **({"stores": r["stores"]} if "stores" in r else {}),
             **({"declines": r["declines"]} if r.get("declines") else {}),
             **({"quality": round_quality(r["metrics"])} if r.get("metrics") else {})}
            for r in rounds
        ],
        "privacy": {
            store: {"epsilon": _finite(p["epsilon"]), "delta": p["delta"],
                    "noise_multiplier": p.get("noise_multiplier", 0.0),
                    "rounds_trained": p.get("rounds_trained", 0), "budget": _finite(p.get("budget")),
                    "declined_rounds": p.get("declined_rounds", 0), "accountant": p.get("accountant", "")}
            for store, p in sorted(privacy.items())
        },
        "elapsed_s": round(elapsed_s, 2),
        # Goods find people: ranking each store's members for its best sellers (mean over stores,
        # member-weighted like the other metrics).
        "audience": {
            "model": {"auc": float(final_metrics.get("audience.auc", 0.0)),
                      "recall@100": float(final_metrics.get("audience.recall@100", 0.0))},
            "member_pop": {"auc": float(final_metrics.get("audience_pop.auc", 0.0)),
                           "recall@100": float(final_metrics.get("audience_pop.recall@100", 0.0))},
        },
        "dp": bool(cfg["dp"]),
        "target_epsilon": float(cfg["target-epsilon"]),
        "metrics_all": {k: float(v) for k, v in sorted(final_metrics.items())},
        "failures": failures,
        "stopped": stopped,
        "data_dir": data_dir,
        "out_dir": out_dir,
    }


def summary_table(results: dict) -> str:
    """A fixed-width table: model vs baselines at @10/@20, then privacy spent."""
    cols = SUMMARY_KEYS
    evaluated = any(r.get("ndcg@10") is not None for r in results["per_round"])
    rows = ([("served model", results["model"]), ("global model", results["global_model"])] if evaluated else []) + \
        [(b, m) for b, m in results["baselines"].items() if evaluated]
    width = max((len(name) for name, _ in rows), default=16) + 2
    lines = ["", f"storefed · {results['stores']} stores · {results['rounds']} rounds · seed {results['seed']}"
             f" · {'DP-SGD' if results['dp'] else 'no DP'} · {results['elapsed_s']:.0f}s", ""]
    trained = any(r.get("participated") for r in results["per_round"])
    if evaluated:
        lines.append("method".ljust(width) + "".join(c.rjust(11) for c in cols))
    elif trained:
        # The deployed default: stores keep their (non-DP) evaluation metrics to themselves.
        lines.append("the model was trained, but no store sent evaluation metrics (fraction-evaluate = 0, or "
                     "the stores keep allow-local-metrics off); the model is in model.pt")
    else:
        lines.append("no round was trained and evaluated in this run, so there is no model to report")
    for name, m in rows:
        lines.append(name.ljust(width) + "".join(f"{m[c]:11.4f}" for c in cols))
    if evaluated:
        aud = results["audience"]
        lines += ["", "goods find people (rank a store's members for its 50 best sellers of the test period):",
                  f"  served model     AUC {aud['model']['auc']:.4f} · recall@100 {aud['model']['recall@100']:.4f}",
                  f"  member_pop       AUC {aud['member_pop']['auc']:.4f} · recall@100 "
                  f"{aud['member_pop']['recall@100']:.4f}"]
    priv = {s: p for s, p in results["privacy"].items() if p["epsilon"] is not None}
    if priv:
        eps = [p["epsilon"] for p in priv.values()]
        sig = [p["noise_multiplier"] for p in priv.values() if p["rounds_trained"] > 0]
        sigma = f"σ {min(sig):.2f}–{max(sig):.2f} · " if sig else ""
        lines += ["", f"privacy per store (member-level, δ ≤ {max(p['delta'] for p in priv.values()):.0e}): "
                  f"ε min {min(eps):.2f} · max {max(eps):.2f} · {sigma}{len(priv)} stores reported"]
    declined = sum(p["declined_rounds"] for p in results["privacy"].values())
    if declined:
        lines.append(f"declined store-rounds (budget): {declined}")
    if results.get("stopped"):
        lines.append(f"stopped early: {results['stopped']}")
    if results.get("failures"):
        shown = [f"{f.get('store') or 'node-' + str(f.get('node'))} in round {f['round']}"
                 for f in results["failures"][:_FAILURES_SHOWN]]
        more = " …" if len(results["failures"]) > _FAILURES_SHOWN else ""
        lines.append(f"failures: {len(results['failures'])} ({', '.join(shown)}{more}; reasons in results.json)")
    lines.append("")
    return "\n".join(lines)

