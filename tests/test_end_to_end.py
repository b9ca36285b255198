"""A real federated run through Flower's simulation runtime, small enough for CI."""

from __future__ import annotations

import json
import math

import pytest

from common.storefiles import write_chain
from common.synth import ChainSpec, generate_chain
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
    for metrics in [results["model"], *results["baselines"].values()]:
        assert set(metrics) == {"ndcg@10", "recall@10", "hit@10", "map@10", "ndcg@20", "recall@20"}
