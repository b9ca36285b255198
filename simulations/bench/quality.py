"""`storefed bench quality`: the DESIGN §6 protocol on one chain, every method on one split.

Methods: global and store popularity, P-TopFreq, TIFU-KNN (centralized, tuned on
validation), a local-only model per store (DP, ε = 8), a centralized model (all stores
pooled, no DP, tuned on validation: the upper reference), federated without DP and federated
with DP at ε ∈ {0.3, 1, 4, 8} per store. The federated runs are real simulations
(:func:`simulations.simulate.simulate`, the same ServerApp and ClientApp as `flwr run .`);
their final global model is then scored here, at every store, with the same code as the
other methods: served with each store's local layer (DESIGN §5.1), and alone
(``<method>_global``). Every method also gets the cold-start slices. This is a benchmark on
generated (or the operator's own) data: it reads every store's files in one process, which a
deployment never does.

Writes ``results.json``, ``report.md`` and three PNG plots to the output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.privacy import accountant as privacy
from common.config import RunConfig, default_chain_dir
from client.store import example_config
from common.data.dataset import StoreData
from common.data.holdout import ValidSplit, truncated, validation_split
from common.evaluation.evaluation import audience_from_scores, list_report, member_pop_audience, member_scores, model_scores
from common.evaluation.metrics import ranking_metrics
from common.evaluation.slices import cold_slice, new_item_slice
from simulations.bench import baselines as tifu
from common.learning.local_layer import adapt, test_histories, training_member_histories
from common.data.ingest import prepare_store
from common.evaluation.metrics import topfreq_scores
from common.learning.model import Recommender
from common.data.storefiles import atomic_write_bytes, atomic_write_text, ensure_generated_chain, store_dirs
from common.data.synth import default_spec
from common.learning.training import (DPConfig, TrainConfig, predict, sample_rate_for, steps_per_epoch, train_local,
                                     train_pooled)
from simulations.bench import quality_report as qr
from client.explore_release import member_sum
from server.explore_prior import prior_arrays

QUICK = {"stores": 4, "rounds": 2}
FULL = {"stores": 20, "rounds": 10}
# The centralized reference is tuned like any model: learning rate and epochs (early stopping,
# patience 1) chosen on a validation split cut from the training period, then retrained on
# the whole training period for the chosen epochs. Never on test.
CENTRAL_LRS = (0.003, 0.01)
CENTRAL_MAX_EPOCHS = {"quick": 3, "full": 8}
PATIENCE = 1
# TIFU-KNN's grid, searched on the same validation split: (group size, r_b, r_g) × α × neighbours.
TIFU_VECTORS = ((7, 0.9, 0.7), (3, 1.0, 0.6))
TIFU_ALPHAS = (0.5, 0.7, 0.9)
TIFU_NEIGHBORS = (50, 300)


@dataclass(frozen=True)
class BenchSettings:
    seed: int = 0
    quick: bool = False
    data: Path | None = None  # a chain directory; None: the generated default chain
    dataset: str | None = None  # the real public data set ``data`` was imported from (simulations.real_data)

    def run_config(self, stores: int) -> RunConfig:
        sizes = QUICK if self.quick else FULL
        values = {"seed": self.seed, "stores": stores, "rounds": sizes["rounds"]}
        if self.data is not None:
            values["data-dir"] = str(self.data)
        return RunConfig.from_mapping(values)


def _chain_dir(settings: BenchSettings) -> Path:
    if settings.data is not None:
        return settings.data
    stores = (QUICK if settings.quick else FULL)["stores"]
    chain = default_chain_dir(settings.seed, stores)
    ensure_generated_chain(chain, default_spec(stores=stores, seed=settings.seed))
    return chain


def _new_model(stores: list[StoreData], cfg: RunConfig, seed: int, explore_prior: bool = False) -> Recommender:
    """A fresh model; with ``explore_prior``, its prior from the stores' exact (not noised) releases,
    as a non-private federated run gets it (DESIGN §5.3): the pooled reference then has the same design."""
    torch.manual_seed(seed)
    model = Recommender(stores[0].items, cfg.model_config())
    if explore_prior and cfg["explore-prior-share"] > 0:
        items = stores[0].items
        total = np.sum([member_sum(d.train_log, items) for d in stores], axis=0)
        prior_item, prior_cat = prior_arrays(total, items.n_items, items.n_categories)
        with torch.no_grad():
            model.prior_item.copy_(torch.from_numpy(prior_item))
            model.prior_cat.copy_(torch.from_numpy(prior_cat))
    return model


def _train_config(cfg: RunConfig, seed: int, epochs: int | None = None, dp: bool = False) -> TrainConfig:
    """The run's local training settings; DP-SGD uses its own optimizer and rate, as the ClientApp does."""
    return TrainConfig(local_epochs=epochs or cfg["local-epochs"], batch_size=cfg["batch-size"],
                       lr=float(cfg["dp-lr"] if dp else cfg["lr"]),
                       optimizer=cfg["dp-optimizer"] if dp else "adam", seed=seed)


def _record(store: StoreData, scores: np.ndarray, audience: dict | None) -> dict:
    return {"store": store.store_id, "train_members": store.n_train_members, **list_report(scores, store),
            "cold": cold_slice(scores, store), "new_items": new_item_slice(scores, store),
            "audience": audience or {"auc": 0.0, "recall@100": 0.0, "items": 0}}


def _model_records(model: Recommender, stores: list[StoreData]) -> tuple[list[dict], list[dict]]:
    """(served, global) records: the model with each store's local layer (DESIGN §5.1, fitted
    at the store on its training period), and the global model alone."""
    served, alone = [], []
    for d in stores:
        g, members = model_scores(model, d), member_scores(model, d)
        alone.append(_record(d, g, audience_from_scores(members, d)))
        layer = adapt(model, d)
        served.append(_record(d, layer.scores(g, test_histories(d)),
                              audience_from_scores(layer.scores(members, training_member_histories(d)), d)))
    return served, alone


def baseline_records(stores: list[StoreData]) -> dict[str, list[dict]]:
    """Per-store records of the non-learned baselines (global/store popularity, P-TopFreq)
    and of the member-popularity audience baseline."""
    global_counts = np.sum([d.store_counts for d in stores], axis=0)
    out: dict[str, list[dict]] = {name: [] for name in (*qr.BASELINE_METHODS, "member_pop")}
    for d in stores:
        freq = topfreq_scores(d.eval_history_items, d.eval_history_counts, d.eval_history_last_day, d.store_counts)
        out["global_pop"].append(_record(d, global_counts[None, :], None))
        out["store_pop"].append(_record(d, d.store_counts[None, :], None))
        out["p_topfreq"].append(_record(d, freq, None))
        out["member_pop"].append({"store": d.store_id, "train_members": d.n_train_members,
                                  "audience": member_pop_audience(d)})
    return out


def _valid_ndcg(model: Recommender, stores: list[StoreData], splits: list[ValidSplit]) -> float:
    """Member-weighted NDCG@10 of the model on the stores' validation splits."""
    values, weights = [], []
    for d, v in zip(stores, splits):
        if len(v.targets):
            m = ranking_metrics(predict(model, v.examples), v.targets, d.assortment)
            values.append(m["ndcg@10"])
            weights.append(len(v.targets))
    return float(np.average(values, weights=weights)) if weights else 0.0


def centralized(stores: list[StoreData], cfg: RunConfig, seed: int, splits: list[ValidSplit],
                quick: bool) -> tuple[list[dict], list[dict], dict]:
    """All stores pooled, no DP, tuned on validation: (served records, global records, info)."""
    model, info = centralized_model(stores, cfg, seed, splits, quick)
    served, alone = _model_records(model, stores)
    return served, alone, info


def centralized_model(stores: list[StoreData], cfg: RunConfig, seed: int, splits: list[ValidSplit],
                      quick: bool) -> tuple[Recommender, dict]:
    """The centralized reference's model (all stores pooled, no DP, tuned on validation) and its info."""
    before = [truncated(d, v.day) for d, v in zip(stores, splits)]
    max_epochs = CENTRAL_MAX_EPOCHS["quick" if quick else "full"]
    tried = []
    for lr in CENTRAL_LRS:
        curve: list[float] = []

        def on_epoch(epoch: int, m: Recommender) -> bool:
            curve.append(_valid_ndcg(m, stores, splits))
            return epoch - (int(np.argmax(curve)) + 1) >= PATIENCE

        model = _new_model(before, cfg, seed, explore_prior=True)
        train_pooled(model, before, dataclasses.replace(_train_config(cfg, seed, max_epochs), lr=lr), on_epoch)
        tried.append({"lr": lr, "valid_ndcg@10": [round(v, 5) for v in curve]})
    best = max(tried, key=lambda t: max(t["valid_ndcg@10"]))
    epochs = int(np.argmax(best["valid_ndcg@10"])) + 1
    model = _new_model(stores, cfg, seed, explore_prior=True)
    result = train_pooled(model, stores, dataclasses.replace(_train_config(cfg, seed, epochs), lr=best["lr"]))
    return model, {"epochs": epochs, "lr": best["lr"], "steps": result.steps, "loss": result.loss,
                   "tried": tried, "valid_days": int(stores[0].cut_day - splits[0].day) if stores else 0}


def _tifu_tie_break(d: StoreData) -> np.ndarray:
    counts = d.store_counts
    return 1e-6 * counts / (counts.max(initial=0.0) + 1.0)


def tifu_knn(stores: list[StoreData], splits: list[ValidSplit]) -> tuple[list[dict], dict]:
    """TIFU-KNN, centralized (neighbours from every store's members), tuned on validation."""
    n_items = stores[0].items.n_items
    offsets = np.cumsum([0] + [d.n_train_members for d in stores])
    results = []
    for size, r_b, r_g in TIFU_VECTORS:
        base = tifu.TifuConfig(group_size=size, r_b=r_b, r_g=r_g, n_neighbors=max(TIFU_NEIGHBORS))
        pool = np.concatenate([tifu.member_vectors(d.train_log, v.upto, n_items, base) for d, v in zip(stores, splits)])
        queries = np.concatenate([v.members + off for v, off in zip(splits, offsets)])
        nbrs = tifu.nearest(pool[queries], pool, base.n_neighbors, exclude=queries)
        start = 0
        per_store_rows = []
        for v in splits:
            per_store_rows.append(np.arange(start, start + len(v.members)))
            start += len(v.members)
        for alpha in TIFU_ALPHAS:
            for k in TIFU_NEIGHBORS:
                c = dataclasses.replace(base, alpha=alpha, n_neighbors=k)
                values, weights = [], []
                for d, v, rows in zip(stores, splits, per_store_rows):
                    if len(rows):
                        pred = tifu.predict(pool[queries[rows]], pool, nbrs[rows], c) + _tifu_tie_break(d)
                        values.append(ranking_metrics(pred, v.targets, d.assortment)["ndcg@10"])
                        weights.append(len(rows))
                results.append((float(np.average(values, weights=weights)), c))
    best_ndcg, best = max(results, key=lambda r: r[0])
    pool = np.concatenate([tifu.member_vectors(d.train_log, d.train_log.n_receipts(), n_items, best) for d in stores])
    records = []
    for d, off in zip(stores, offsets):
        row = {m: i for i, m in enumerate(d.member_ids)}
        idx = np.array([off + row[m] if m in row else -1 for m in d.eval_member_ids], dtype=np.int64)
        own = np.where((idx >= 0)[:, None], pool[np.maximum(idx, 0)], 0.0).astype(np.float32)
        nbrs = tifu.nearest(own, pool, best.n_neighbors, exclude=idx)
        records.append(_record(d, tifu.predict(own, pool, nbrs, best) + _tifu_tie_break(d), None))
    return records, {"config": dataclasses.asdict(best), "valid_ndcg@10": round(best_ndcg, 5), "grid": len(results)}


def local_only(store: StoreData, cfg: RunConfig, seed: int, target_epsilon: float) -> tuple[dict, dict]:
    """One store trains alone with the federated runs' DP settings: the same rounds of local
    epochs (a fresh optimizer each round, as in federation), σ calibrated to ``target_epsilon``."""
    model, info = local_only_model(store, cfg, seed, target_epsilon)
    served, _ = _model_records(model, [store])
    return served[0], info


def local_only_model(store: StoreData, cfg: RunConfig, seed: int, target_epsilon: float) -> tuple[Recommender, dict]:
    """The local-only model of :func:`local_only` and its privacy info."""
    model = _new_model([store], cfg, seed)
    n, batch = store.n_train_members, cfg["batch-size"]
    rounds, epochs = cfg["rounds"], cfg["local-epochs"]
    delta = privacy.store_delta(n, cfg["delta"])
    q = sample_rate_for(n, batch)
    steps = rounds * epochs * steps_per_epoch(n, batch)
    sigma = privacy.calibrate_noise(target_epsilon, delta, q, steps, cfg["accountant"])
    dp = DPConfig(noise_multiplier=sigma, clip_norm=cfg["clip-norm"])
    for r in range(rounds):
        train_local(model, store, _train_config(cfg, seed + 1000 * (r + 1), dp=True), dp)
    spent = privacy.epsilon([(sigma, q, steps)], delta, cfg["accountant"])
    return model, {"store": store.store_id, "noise_multiplier": sigma, "epsilon": spent, "delta": delta}


def federated(name: str, cfg: RunConfig, stores: list[StoreData], out: Path, *, dp: bool,
              target_epsilon: float = 8.0) -> tuple[list[dict], list[dict], dict]:
    """A real federated simulation; its final global model scored at every store, with each
    store's local layer (served) and alone (global)."""
    model, info = federated_model(name, cfg, stores, out, dp=dp, target_epsilon=target_epsilon)
    served, alone = _model_records(model, stores)
    return served, alone, info


def federated_model(name: str, cfg: RunConfig, stores: list[StoreData], out: Path, *, dp: bool,
                    target_epsilon: float = 8.0) -> tuple[Recommender, dict]:
    """A real federated simulation (:func:`federated`): its final global model and its info."""
    from simulations.simulate import simulate

    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    # The local layer is fitted here, in-process, on the final model (the same code the stores run).
    config = {**cfg.values, "dp": dp, "target-epsilon": target_epsilon, "local-layer": False,
              "epsilon-budget": max(target_epsilon, cfg["epsilon-budget"]),
              "out-dir": str(run_dir), "state-dir": tempfile.mkdtemp(prefix=f"storefed-bench-{name}-")}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            results = simulate(config)
    finally:
        # The run's own per-round lines are kept next to its results, not lost.
        atomic_write_text(run_dir / "log.txt", log.getvalue())
    model = _new_model(stores, cfg, cfg["seed"])
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    eps = [p["epsilon"] for p in results["privacy"].values() if p["epsilon"] is not None]
    info = {"per_round": [{"round": r["round"], "ndcg@10": r["ndcg@10"]} for r in results["per_round"]],
            "max_epsilon": max(eps) if eps else None, "elapsed_s": results["elapsed_s"],
            "failures": results["failures"], "dp": dp, "target_epsilon": target_epsilon if dp else None}
    return model, info


def run_quality_bench(settings: BenchSettings, out: Path, *, progress: bool = True) -> dict:
    """Run every method, write ``results.json``, ``report.md`` and the plots; return the results."""
    from tqdm import tqdm

    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    chain = _chain_dir(settings)
    dirs = store_dirs(chain)
    cfg = settings.run_config(len(dirs))
    seed = settings.seed
    fed_runs = [("fed_nodp", False, 8.0)] + [(f"fed_dp_eps{e:g}", True, e) for e in sorted(qr.EPSILONS, reverse=True)]
    bar = tqdm(total=len(dirs) * 2 + 3 + len(fed_runs), desc="quality", unit="step", disable=not progress,
               dynamic_ncols=True)
    stores = []
    ex_cfg = example_config(cfg)
    for d in dirs:
        bar.set_postfix_str(f"reading {d.name}")
        stores.append(prepare_store(d, chain, ex_cfg, quarantine_dir=Path(tempfile.mkdtemp()))[0])
        bar.update()
    bar.set_postfix_str("baselines")
    per_store = baseline_records(stores)
    bar.update()
    splits = [validation_split(d) for d in stores]
    bar.set_postfix_str("centralized (pooled, no DP, tuned on validation)")
    per_store["centralized"], per_store["centralized_global"], central_info = centralized(stores, cfg, seed, splits,
                                                                                          settings.quick)
    bar.update()
    bar.set_postfix_str("TIFU-KNN (pooled, tuned on validation)")
    per_store["tifu_knn"], tifu_info = tifu_knn(stores, splits)
    bar.update()
    per_store["local_dp_eps8"], local_info = [], []
    for d in stores:
        bar.set_postfix_str(f"local-only {d.store_id}")
        record, info = local_only(d, cfg, seed, 8.0)
        per_store["local_dp_eps8"].append(record)
        local_info.append(info)
        bar.update()
    fed_info = {}
    for name, dp, eps in fed_runs:
        bar.set_postfix_str(f"federated {name}")
        per_store[name], per_store[f"{name}_global"], fed_info[name] = federated(name, cfg, stores, out, dp=dp,
                                                                                 target_epsilon=eps)
        bar.update()
    bar.close()

    fed_names = [name for name, _, _ in fed_runs]
    order = ("global_pop", "store_pop", "p_topfreq", "tifu_knn", "local_dp_eps8", "centralized", *fed_names,
             "centralized_global", *(f"{n}_global" for n in fed_names), "member_pop")
    methods = {}
    for name in order:
        summary = qr.summarize_audience if name == "member_pop" else qr.summarize
        methods[name] = {**summary(per_store[name]), "per_store": per_store[name]}
        if name in fed_info:
            methods[name].update(fed_info[name])
    methods["centralized"]["training"] = central_info
    methods["tifu_knn"]["tuning"] = tifu_info
    methods["local_dp_eps8"]["privacy"] = local_info
    settings_out = {
        "data": str(chain), "generated": settings.data is None, "seed": seed, "quick": settings.quick,
        "stores": len(stores), "train_members": int(sum(d.n_train_members for d in stores)),
        "eval_members": int(sum(len(d.eval_member_ids) for d in stores)), "catalog": int(stores[0].items.n_items),
        "rounds": cfg["rounds"], "local_epochs": cfg["local-epochs"], "batch_size": cfg["batch-size"],
        "lr": cfg["lr"], "clip_norm": cfg["clip-norm"], "delta": cfg["delta"],
        "accountant": cfg["accountant"], "central_epochs": central_info["epochs"],
        "central_lr": central_info["lr"], "dp_optimizer": cfg["dp-optimizer"], "dp_lr": cfg["dp-lr"],
        "test_days": cfg["test-days"], "epsilons": list(qr.EPSILONS), "dim": cfg["dim"],
        "hidden": cfg["hidden"], "dataset": settings.dataset,
        "provenance": _provenance(settings.dataset),
        "store_sizes": sorted(int(d.n_train_members) for d in stores),
    }
    results = {"settings": settings_out, "methods": methods, "targets": qr.evaluate_targets(methods),
               "elapsed_s": round(time.time() - started, 1)}
    write_plots(results, out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "report.md", qr.markdown_report(results))
    return results


def _provenance(dataset: str | None) -> str | None:
    """Where a real data set's lines come from (the licence line of simulations/README.md), or None."""
    if dataset is None:
        return None
    from simulations.real_data import DATASETS, PACKAGED

    spec = PACKAGED[DATASETS[dataset]]
    return f"{spec.provenance}, version {spec.version}"


def write_plots(results: dict, out: Path) -> None:
    """NDCG@10 vs ε, NDCG@10 per round, and per-store NDCG@10 vs store size, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    m = results["methods"]
    ndcg = {k: v["member_weighted"]["all"]["ndcg@10"] for k, v in m.items() if "member_weighted" in v}

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    eps = list(qr.EPSILONS)
    ax.plot(eps, [ndcg[f"fed_dp_eps{e:g}"] for e in eps], "o-", label="federated, DP (ε per store)")
    ax.plot([8.0], [ndcg["local_dp_eps8"]], "s", label="local-only, DP ε = 8")
    for name, style in (("centralized", "k--"), ("fed_nodp", "b:"), ("p_topfreq", "g-."), ("store_pop", "r:")):
        ax.axhline(ndcg[name], linestyle=style[1:], color=style[0], label=name.replace("_", " "))
    _save(fig, ax, "ε per store (δ ≤ 1e-6)", "NDCG@10 (member-weighted)", "Quality vs privacy", out / "ndcg_vs_epsilon.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in ("fed_nodp", "fed_dp_eps8", "fed_dp_eps4", "fed_dp_eps1"):
        rounds = [r for r in m[name]["per_round"] if r["ndcg@10"] is not None]
        ax.plot([r["round"] for r in rounds], [r["ndcg@10"] for r in rounds], "o-", label=name.replace("_", " "))
    ax.axhline(ndcg["p_topfreq"], linestyle="-.", color="g", label="p topfreq")
    _save(fig, ax, "round", "NDCG@10 (federated evaluation)", "NDCG@10 per round", out / "ndcg_per_round.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, marker in (("local_dp_eps8", "s"), ("fed_dp_eps8", "o")):
        rows = [r for r in m[name]["per_store"] if r["all"]["members"] > 0]
        ax.scatter([r["train_members"] for r in rows], [r["all"]["ndcg@10"] for r in rows], marker=marker,
                   label=name.replace("_", " "))
    ax.set_xscale("log")
    _save(fig, ax, "store size (training members)", "NDCG@10 at the store",
          "Per store: local-only vs federated (both DP, ε = 8)", out / "per_store_vs_size.png")


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Label the plot, then write it as a PNG atomically."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
