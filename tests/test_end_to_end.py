"""A real federated run through Flower's simulation runtime, small enough for CI."""

from __future__ import annotations

import json
import math

import pytest

from common.data.storefiles import write_chain
from common.data.synth import ChainSpec, generate_chain
from simulations.simulate import simulate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    write_chain(generate_chain(ChainSpec(stores=3, members=1200, items=500, categories=15, brands=50, seed=1)),
                base / "chain")
    return simulate({"stores": 3, "rounds": 2, "seed": 1, "data-dir": str(base / "chain"),
                     "out-dir": str(base / "out"), "node-wait-s": 30.0}), base


def test_three_stores_two_rounds_complete(run):
    results, base = run
    assert results["stores"] == 3 and results["rounds"] == 2
    assert [r["round"] for r in results["per_round"]] == [1, 2]
    assert all(r["participated"] == 3 and r["failed"] == 0 for r in results["per_round"])
    assert json.loads((base / "out" / "results.json").read_text()) == results
    assert (base / "out" / "model.pt").exists()


def test_the_global_model_went_to_the_workers_once_per_round_not_once_per_store(run):
    from simulations import sim_backend

    tasks = [d for d in sim_backend.DISPATCH if d[0] in ("train", "evaluate")]
    assert len(tasks) == 3 * 2 * 2 and all(d[4] for d in tasks)  # every task's model went by reference
    # One put per distinct global model: the initial one and each round's aggregate (which
    # round 2's training, round 1's evaluation… and the final delivery share), not one per store.
    assert sim_backend.OUTBOX[0].puts == 1 + 2
    assert sum(1 for d in sim_backend.DISPATCH if d[4]) == 3 * (2 + 2 + 1)  # train, evaluate ×2, delivery


def test_epsilon_is_finite_positive_and_grows_with_rounds(run):
    results, _ = run
    assert set(results["privacy"]) == {"S001", "S002", "S003"}
    for store in results["privacy"].values():
        assert 0 < store["epsilon"] < math.inf
        assert store["rounds_trained"] == 2
        assert store["delta"] <= 1e-6
        assert store["noise_multiplier"] > 0
    first, second = (r["max_epsilon"] for r in results["per_round"])
    assert 0 < first < second <= 8.0 + 1e-6


def test_the_model_beats_random_ranking(run):
    results, _ = run
    # A random top-10 from an assortment of A ≥ 200 items has expected recall 10/A ≤ 0.05,
    # and NDCG@10 ≤ recall@10; the learned model must clear that by far.
    assert results["model"]["ndcg@10"] > 0.15
    assert results["model"]["recall@10"] > 0.15
    assert set(results["baselines"]) == {"store_pop", "p_topfreq"}
    # Goods find people: ranking members for the best sellers beats chance.
    assert results["audience"]["model"]["auc"] > 0.6
    assert 0 < results["audience"]["member_pop"]["auc"] < 1
    # The served model (with each store's local layer) next to the global model alone.
    assert results["global_model"]["ndcg@10"] > 0.15
    assert results["model"] != results["global_model"]
    for metrics in [results["model"], results["global_model"], *results["baselines"].values()]:
        assert set(metrics) == {"ndcg@10", "recall@10", "hit@10", "map@10", "ndcg@20", "recall@20"}


def test_a_store_over_its_budget_declines_and_the_others_train(tmp_path):
    chain = tmp_path / "chain"
    write_chain(generate_chain(ChainSpec(stores=3, members=900, items=400, categories=12, brands=40, seed=2)), chain)
    meta_path = chain / "stores" / "S002" / "store.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "epsilon_budget": 0.05}))
    results = simulate({"stores": 3, "rounds": 2, "seed": 2, "data-dir": str(chain), "out-dir": str(tmp_path / "out")})
    assert [(r["participated"], r["declined"]) for r in results["per_round"]] == [(2, 1), (2, 1)]
    assert results["privacy"]["S002"]["declined_rounds"] == 2
    assert results["privacy"]["S002"]["rounds_trained"] == 0
    assert results["privacy"]["S001"]["rounds_trained"] == 2
    assert results["stopped"] is None
    assert not (chain / "stores" / "S002" / "state" / "privacy-ledger.jsonl").exists()


def test_a_budget_below_one_round_makes_every_store_decline_and_the_run_says_so(tmp_path):
    chain = tmp_path / "chain"
    write_chain(generate_chain(ChainSpec(stores=2, members=600, items=300, categories=10, brands=30, seed=4)), chain)
    results = simulate({"stores": 2, "rounds": 3, "seed": 4, "data-dir": str(chain), "epsilon-budget": 0.05,
                        "out-dir": str(tmp_path / "out")})
    assert "every store declined round 1" in results["stopped"]
    assert len(results["per_round"]) == 1 and results["per_round"][0]["declined"] == 2
    assert all(p["declined_rounds"] == 1 and p["rounds_trained"] == 0 for p in results["privacy"].values())


def test_two_runs_on_one_state_dir_compose_and_an_outsider_can_recompute(tmp_path):
    """`storefed simulate` twice, then `storefed privacy --json`, checked with dp-accounting."""
    import dp_accounting as dpa

    from simulations.privacy_report import privacy_report

    chain = tmp_path / "chain"
    write_chain(generate_chain(ChainSpec(stores=2, members=600, items=300, categories=10, brands=30, seed=6)), chain)
    config = {"stores": 2, "rounds": 2, "seed": 6, "data-dir": str(chain), "target-epsilon": 2.0,
              "state-dir": str(tmp_path / "state")}
    first = simulate({**config, "out-dir": str(tmp_path / "a")})
    second = simulate({**config, "out-dir": str(tmp_path / "b")})
    report = privacy_report(chain / "stores" / "S001", tmp_path / "state" / "S001")
    assert len(report["events"]) == 4 and len(report["runs"]) == 2
    assert report["epsilon"] == pytest.approx(second["privacy"]["S001"]["epsilon"])
    assert second["privacy"]["S001"]["epsilon"] > first["privacy"]["S001"]["epsilon"]
    # An outsider recomputes ε from the JSON events alone.
    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(e["sample_rate"], dpa.GaussianDpEvent(e["noise_multiplier"])),
                                      e["steps"]) for e in report["events"]]
    reference = dpa.pld.PLDAccountant().compose(dpa.ComposedDpEvent(events)).get_epsilon(report["delta"])
    assert 0.99 * reference <= report["epsilon"] <= 1.10 * reference


def test_every_store_keeps_the_final_model(run):
    """Model delivery (DESIGN §5.2): each store's state holds the server's final weights."""
    import torch

    from client.layer_store import read_layer
    from client.model_store import read_info
    from common.learning.weights import weights_digest

    results, base = run
    server_hash = weights_digest(torch.load(base / "out" / "model.pt", weights_only=True))
    assert results["delivery"]["hash"] == server_hash
    assert results["delivery"]["delivered"] == ["S001", "S002", "S003"] and results["delivery"]["failed"] == []
    runs = set()
    for store in ("S001", "S002", "S003"):
        state = base / "chain" / "stores" / store / "state"
        info = read_info(state)
        assert info["hash"] == server_hash and info["round"] == 2 and info["final"] is True
        assert weights_digest(torch.load(state / "model.pt", weights_only=True)) == server_hash
        # With it, the store-local layer fitted on it (the final evaluation's), for serving.
        assert read_layer(state, server_hash)[1]["fitted_by"] == "delivery"
        assert info["epsilon"] == pytest.approx(results["privacy"][store]["epsilon"], rel=1e-9)
        # The first message with a trained global model (round 1's evaluation or round 2's
        # training) was kept mid-run and then replaced by the final one of the same run: the
        # previous model is always an earlier run's, and this chain had none (issue 22, item 4).
        runs.add(info["delivered_in_run"])
        assert not (state / "model.prev.json").exists() and not (state / "model.prev.pt").exists()
    assert len(runs) == 1 and runs != {""}  # one run delivered every store's model
