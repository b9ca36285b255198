"""Candidate designs of the private learning, measured fast (research only; issue 24, item 3).

``python -m simulations.bench.dp_candidates [--epsilon 8] [--no-dp] [--epochs 2] [--dp-lr 2.0]
[--batch 128] [--dim 64] [--ids-init zero|random] [--freeze-ids] [--rounds 10] [--stores 20]
[--seed 0] [--prior-share 0.5] [--freeze auto|none|LAYERS] [--diagnose]`` runs FedAvg over the generated chain's stores in one process — each store trains
with :func:`common.learning.training.train_local`, the function the ClientApp calls, at σ
calibrated from its published size for the run's ε (prv, δ 1e-6) — and prints the final
global model's member-weighted NDCG@10 on "all" items and on "explore" (items new to the
member), as JSON. No Flower, no ledger, no local layer: a quick comparison of designs before
one of them goes through ``storefed bench quality``. Reads every store in one process,
which a deployment never does.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import DEFAULTS, RunConfig, default_chain_dir
from common.data.dataset import ExampleConfig, StoreData
from common.data.ingest import prepare_store
from common.data.storefiles import ensure_generated_chain, read_store_meta, store_dirs
from common.data.synth import default_spec
from common.evaluation.evaluation import list_report, model_scores
from common.learning.model import ModelConfig, Recommender
from common.learning.training import DPConfig, TrainConfig, sample_rate_for, steps_per_epoch, train_local
from common.privacy import accountant as privacy
from client.explore_release import member_sum, release_length
from server.explore_prior import prior_arrays, summed


@dataclass(frozen=True)
class Candidate:
    epsilon: float = 8.0
    dp: bool = True
    epochs: int = int(DEFAULTS["local-epochs"])
    dp_lr: float = 2.0
    batch: int = 128
    dim: int = 64
    ids_init: str = "zero"  # the model's own init: item-ID vectors at 0 (items start as their category + brand);
    # "random": N(0, 0.1), the design before issue 24
    freeze_ids: bool = False  # item-ID vectors not trained (their bias still is)
    rounds: int = 10
    prior_share: float = 0.0  # share of ε spent on the explore-prior release (0: no release)
    freeze: tuple[str, ...] = ()  # layers not trained (e.g. item_out, cat_out, brand_out: the item side)
    noise_cut: bool = False  # soft-threshold the summed release at 2 noise deviations (measured: loses)
    shrink: bool = False  # item popularity shrunk toward its category's mean by the known noise (empirical Bayes)
    item_weight: float = 0.5 ** 0.5  # the release's item-part norm per member (the rest: category part)
    cap: int = 0  # > 0: only a member's `cap` most bought items in the release's item part


def load_chain(stores: int, seed: int, data: str = "") -> list[tuple[StoreData, int]]:
    """(prepared store, published size) of every store of the generated chain, or of the
    chain directory ``data`` (e.g. one `storefed import` wrote)."""
    if data:
        chain = Path(data).expanduser()
    else:
        chain = default_chain_dir(seed, stores)
        ensure_generated_chain(chain, default_spec(stores=stores, seed=seed))
    out = []
    for store in store_dirs(chain):
        data, _ = prepare_store(store, chain, ExampleConfig())
        out.append((data, int(read_store_meta(store).get("published_size") or data.n_train_members)))
    return out


def run(stores: list[tuple[StoreData, int]], c: Candidate, seed: int = 0) -> dict:
    """Train the candidate federated and score its final global model alone."""
    torch.manual_seed(seed)
    model_cfg = ModelConfig(dim=c.dim)
    model = Recommender(stores[0][0].items, model_cfg)
    if c.ids_init == "random":
        with torch.no_grad():
            torch.nn.init.normal_(model.item_out.weight, std=0.1)
    sigma, releases, release_var = {}, [], 0.0
    rng = np.random.default_rng(seed + 7)
    for data, size in stores:
        q, steps = sample_rate_for(size, c.batch), c.epochs * steps_per_epoch(size, c.batch)
        prior = []
        if c.prior_share > 0:
            sigma_r = privacy.calibrate_noise(c.prior_share * c.epsilon, 1e-6, 1.0, 1, "prv") if c.dp else 0.0
            prior = [(sigma_r, 1.0, 1)] if c.dp else []
            releases.append(member_sum(data.train_log, data.items, c.item_weight, c.cap) + rng.normal(0.0, sigma_r, release_length(data.items)))
            release_var += sigma_r ** 2
        sigma[data.store_id] = (privacy.calibrate_noise(c.epsilon, 1e-6, q, c.rounds * steps, "prv", prior=prior)
                                if c.dp else 0.0)
    if releases:
        items = stores[0][0].items
        prior_item, prior_cat = prior_arrays(summed(releases, release_length(items)), items.n_items, items.n_categories,
                                             2.0 * float(np.sqrt(release_var)) if c.noise_cut else 0.0,
                                             noise_std=float(np.sqrt(release_var)) if c.shrink else 0.0,
                                             item_category=items.category)
        with torch.no_grad():
            model.prior_item.copy_(torch.as_tensor(prior_item))
            model.prior_cat.copy_(torch.as_tensor(prior_cat))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.monotonic()
    for server_round in range(c.rounds):
        states, sizes = [], []
        for i, (data, size) in enumerate(stores):
            local = Recommender(data.items, model_cfg)
            local.load_state_dict(weights)
            local.item_out.weight.requires_grad_(not c.freeze_ids)
            for name in c.freeze:
                getattr(local, name).requires_grad_(False)
            cfg = TrainConfig(local_epochs=c.epochs, batch_size=c.batch, lr=c.dp_lr if c.dp else 0.01,
                              optimizer="sgd" if c.dp else "adam", seed=seed * 1000 + server_round * 50 + i)
            train_local(local, data, cfg, DPConfig(sigma[data.store_id], 1.0, size) if c.dp else None)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            sizes.append(size)
        share = np.asarray(sizes, dtype=np.float64) / sum(sizes)
        weights = {k: sum(float(w) * s[k] for w, s in zip(share, states)) for k in weights}
    model.load_state_dict(weights)
    totals = {"all": [0.0, 0], "explore": [0.0, 0]}
    for data, _ in stores:
        report = list_report(model_scores(model, data), data)
        for part, acc in totals.items():
            acc[0] += report[part]["ndcg@10"] * report[part]["members"]
            acc[1] += report[part]["members"]
    return {**{f"{part}_ndcg@10": round(s / max(n, 1), 4) for part, (s, n) in totals.items()},
            "train_s": round(time.monotonic() - started, 1), "candidate": c.__dict__}


def diagnose(stores: list[tuple[StoreData, int]], epsilon: float, rounds: int = 10, batch: int = 128,
             seed: int = 0) -> list[dict]:
    """Per layer, at the initial model: the clipped signal against the DP noise.

    For each store, one pass over all its training members gives each member's gradient
    clipped to C = 1 as a whole (the mechanism's own clipping); the layer's *signal per step*
    is the norm of that layer's part of the mean clipped gradient (what a batch of the
    expected size adds, noise aside), its *noise per step* σC√d / B. Over a run the mean of
    N stores' S steps adds the signal coherently (an upper bound: the direction held fixed)
    and the noise as √(N·S): ``run_snr`` = signal / noise · √(N·S), medians over stores.
    """
    from common.data.dataset import sample_train_examples
    from common.learning import dp_fast
    from common.learning.model import BasketLoss
    from common.learning.training import batch_tensors

    rows: dict[str, dict] = {}
    for data, size in stores:
        q, steps = sample_rate_for(size, batch), steps_per_epoch(size, batch)
        sigma = privacy.calibrate_noise(epsilon, 1e-6, q, rounds * steps, "prv")
        torch.manual_seed(seed)
        model = Recommender(data.items)
        tapped, _, criterion = dp_fast.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), BasketLoss(),
                                                    noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=1)
        examples = sample_train_examples(data, np.random.default_rng(seed))
        *inputs, t_items, t_mask = batch_tensors(examples, np.arange(len(examples)))
        criterion(tapped(*inputs), t_items, t_mask).backward()
        tapped.remove_hooks()
        divisor = max(1, int(size * q))
        for name, module in model.named_children():
            params = [p for p in module.parameters() if p.grad is not None]
            if not params:
                continue
            d = sum(p.numel() for p in params)
            signal = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params))) / len(examples)
            noise = sigma * np.sqrt(d) / divisor
            row = rows.setdefault(name, {"layer": name, "params": d, "signal": [], "noise": [], "snr": [], "run_snr": []})
            row["signal"].append(signal)
            row["noise"].append(noise)
            row["snr"].append(signal / noise)
            row["run_snr"].append(signal / noise * np.sqrt(len(stores) * rounds * steps))
    return [{"layer": r["layer"], "params": r["params"],
             **{k: round(float(np.median(r[k])), 4) for k in ("signal", "noise", "snr", "run_snr")}}
            for r in rows.values()]


def _frozen(spec: str, epsilon: float, dp: bool) -> tuple[str, ...]:
    if spec == "auto":
        return RunConfig.from_mapping({"target-epsilon": epsilon, "dp": dp}).frozen_layers()
    return () if spec == "none" else tuple(x for x in spec.split(",") if x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--epochs", type=int, default=int(DEFAULTS["local-epochs"]))
    p.add_argument("--dp-lr", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ids-init", choices=("zero", "random"), default="zero",
                   help="item-ID vectors at 0 (the model's init) or N(0, 0.1) (the design before issue 24)")
    p.add_argument("--freeze-ids", action="store_true")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--stores", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-cut", action="store_true",
                   help="soft-threshold the summed release at 2 noise deviations (a candidate that lost)")
    p.add_argument("--shrink", action="store_true",
                   help="shrink each item's summed release toward its category's mean by the known noise")
    p.add_argument("--item-weight", type=float, default=0.5 ** 0.5,
                   help="the release's item-part norm per member (the category part gets the rest)")
    p.add_argument("--cap", type=int, default=0, help="> 0: a member's most bought items only, in the item part")
    p.add_argument("--data", default="", help="a chain directory instead of the generated chain")
    p.add_argument("--freeze", default="auto",
                   help="comma-separated layers not trained (e.g. item_out,cat_out,brand_out), 'none', or 'auto': "
                        "the run config's dp-train rule (the item side and encoder below ε 2)")
    p.add_argument("--prior-share", type=float, default=float(DEFAULTS["explore-prior-share"]),
                   help="share of ε for the explore-prior release (DESIGN §5.3; 0: none, the design before it)")
    p.add_argument("--diagnose", action="store_true", help="per layer: clipped signal against DP noise, no training")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.diagnose:
        print(json.dumps(diagnose(load_chain(a.stores, a.seed, a.data), a.epsilon, a.rounds, a.batch, a.seed)))
        return
    candidate = Candidate(a.epsilon, not a.no_dp, a.epochs, a.dp_lr, a.batch, a.dim, a.ids_init, a.freeze_ids, a.rounds,
                          a.prior_share, _frozen(a.freeze, a.epsilon, not a.no_dp),
                          a.noise_cut, a.shrink, a.item_weight, a.cap)
    print(json.dumps(run(load_chain(a.stores, a.seed, a.data), candidate, a.seed)))


if __name__ == "__main__":
    main()
