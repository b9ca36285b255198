"""Benchmarks' quick modes run and report every key (no speed is asserted in tests)."""

from __future__ import annotations

import json

from simulations.cli import main

DP_KEYS = {"catalog", "plain_step_ms", "dp_step_ms", "ratio", "plain_peak_mb", "dp_peak_mb", "memory_ratio",
           "secure_step_ms", "secure_ratio"}


def test_bench_dp_quick_reports_every_key(capsys):
    assert main(["bench", "dp", "--quick", "--catalog", "300", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["cases"]) == 1 and DP_KEYS <= set(result["cases"][0])
    case = result["cases"][0]
    assert case["catalog"] == 300 and case["plain_step_ms"] > 0 and case["dp_step_ms"] > 0
    assert case["ratio"] == round(case["dp_step_ms"] / case["plain_step_ms"], 3) or abs(
        case["ratio"] - case["dp_step_ms"] / case["plain_step_ms"]) < 0.01


def test_bench_validate_counts_every_line(capsys):
    assert main(["bench", "validate", "--lines", "20000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tx = result["transactions"]
    assert result["lines"] == tx["rows_in"] == 20000
    assert tx["rows_in"] == tx["accepted"] + sum(tx["excluded"].values()) + sum(tx["quarantined"].values())
    assert result["rows_per_s"] > 0 and result["peak_rss_mb"] > 0


SIM_KEYS = {"stores", "sim_s", "plain_s", "overhead", "bytes_per_store_round", "peak_rss_mb",
            "steady_overhead", "startup_s"}


def test_bench_sim_phases_and_steady_overhead_by_hand():
    from simulations.bench_sim import phases, steady_overhead

    # started 0, first task at 2, rounds end at 5, 7, 10, everything stopped at 11
    assert phases(0.0, 2.0, [5.0, 7.0, 10.0], 11.0) == {"startup_s": 2.0, "round_s": [3.0, 2.0, 3.0],
                                                         "shutdown_s": 1.0}
    # rounds after the first: (2 + 3) / 2 = 2.5 s against (1 + 2) / 2 = 1.5 s
    assert abs(steady_overhead([9.0, 2.0, 3.0], [4.0, 1.0, 2.0]) - (2.5 / 1.5 - 1)) < 1e-12
    assert steady_overhead([3.0], [2.0]) is None


def test_bench_sim_dispatch_medians_by_hand():
    from simulations.bench_sim import dispatch_ms

    nan = float("nan")
    tasks = [("train", 0.001, nan, 0.5, True, 0.0005), ("train", 0.003, 0.002, 0.7, True, 0.0001),
             ("train", 0.002, 0.004, 0.6, False, 0.003), ("evaluate", 0.010, nan, nan, False, 0.004)]
    got = dispatch_ms(tasks)
    # train: submit median of 1, 3, 2 ms (CPU 0.5, 0.1, 3 ms); idle of the 2nd and 3rd tasks (2, 4 ms); run 0.6 s
    assert got["train"] == {"tasks": 3, "submit": 2.0, "submit_cpu": 0.5, "idle": 3.0, "run": 600.0,
                            "by_reference": 0.667}
    assert got["evaluate"] == {"tasks": 1, "submit": 10.0, "submit_cpu": 4.0, "idle": None, "run": None,
                               "by_reference": 0.0}


def test_bench_sim_quick_reports_every_key(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("STOREFED_CACHE", str(tmp_path))
    assert main(["bench", "sim", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["cases"]) == 1 and SIM_KEYS <= set(result["cases"][0])
    case = result["cases"][0]
    assert case["sim_s"] > 0 and case["plain_s"] > 0 and case["peak_rss_mb"] > 0
    assert abs(case["overhead"] - (case["sim_s"] / case["plain_s"] - 1)) < 0.01
    # One round: no steady state to compare; the phases add up to the run's wall time.
    assert case["steady_overhead"] is None and len(case["round_s"]) == 1
    assert 0 < case["startup_s"] < case["sim_s"]
    # Both stores' train and evaluate tasks took the round's model by reference.
    dispatch = case["dispatch_ms"]
    assert dispatch["train"]["tasks"] == dispatch["evaluate"]["tasks"] == 2
    assert dispatch["train"]["by_reference"] == dispatch["evaluate"]["by_reference"] == 1.0
    # Two distinct global models (the initial one, round 1's aggregate), put once each.
    assert case["models_put"] == 2
    assert result["memory_check"] is None  # --quick: no 500-store run
    assert abs(case["startup_s"] + sum(case["round_s"]) + case["shutdown_s"] - case["sim_s"]) < 0.05
    # A float32 reply holds every parameter: at least 4 bytes each of the generated catalog's model.
    from common.data.dataset import ItemIndex
    from common.learning.model import Recommender
    from common.data.storefiles import read_catalog
    from simulations.bench_sim import QUICK, chain_for

    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_for(QUICK["stores"][0], QUICK["members"]))))
    params = sum(v.numel() for v in model.state_dict().values())
    assert 4 * params <= case["bytes_per_store_round"] < 4 * params * 1.01
