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
    # The ratio is of the unrounded times; the times are printed to 0.01 ms, the ratio to 0.001.
    dp, plain = case["dp_step_ms"], case["plain_step_ms"]
    slack = (dp / plain) * (0.005 / dp + 0.005 / plain) * 1.01 + 0.0005
    assert abs(case["ratio"] - dp / plain) <= slack


def _dp_case(catalog, ratio, memory_ratio):
    return {"catalog": catalog, "ratio": ratio, "memory_ratio": memory_ratio}


def test_bench_dp_verdicts_on_fixed_inputs():
    from simulations.bench.dp import verdicts

    targets = {"ratio": 1.5, "memory_ratio": 1.3, "at_catalog": 10_000}
    # Only the target catalog is judged; "≤ target" passes at the target itself.
    lines = verdicts({"targets": targets, "cases": [_dp_case(2000, 9.0, 9.0), _dp_case(10_000, 1.5, 1.31)]})
    assert lines == ["PASS: ratio 1.50 at catalog 10000 (target ≤ 1.5)",
                     "FAIL: memory_ratio 1.31 at catalog 10000 (target ≤ 1.3)"]
    lines = verdicts({"targets": targets, "cases": [_dp_case(10_000, 1.51, 1.3)]})
    assert [line.split(":")[0] for line in lines] == ["FAIL", "PASS"]
    assert verdicts({"targets": targets, "cases": [_dp_case(2000, 1.0, 1.0)]}) == [
        "no case at catalog 10000: targets not checked"]


def _sim_case(stores, sim_s, overhead, steady, peak, plain_peak, ndcg, plain_ndcg, size="small"):
    return {"stores": stores, "members_per_store": 100, "sim_s": sim_s, "overhead": overhead, "steady_overhead": steady,
            "peak_rss_mb": peak, "plain_peak_rss_mb": plain_peak, "ndcg@10": ndcg, "plain_ndcg@10": plain_ndcg,
            "size": size}


SIM_TARGETS = {"overhead": 0.30, "from_stores": 100, "steady_overhead": 0.15, "memory_ratio": 1.2}


def _verdicts_sim(cases, memory_check=None):
    from simulations.bench.sim import verdicts

    return [line.split(":")[0] + ":" + line.split(":")[1].split(" ")[1]
            for line in verdicts({"targets": SIM_TARGETS, "cases": cases, "memory_check": memory_check})]


def test_bench_sim_verdicts_on_fixed_inputs():
    # Below 100 stores nothing is judged.
    assert _verdicts_sim([_sim_case(20, 10.0, 5.0, 5.0, 900.0, 100.0, 0.1, 0.9)]) == []
    # At 100 stores: overhead 0.30 ≤ 0.30, steady 0.16 > 0.15, memory 120/100 = 1.2 ≤ 1.2,
    # NDCG gap 0.0049 ≤ 0.005; at 500: overhead 0.31, memory 1.25×, gap 0.006, and the wall
    # time grew 5.5× for 5× the stores (> 1.1 × linear); 500 stores fit 24 GiB.
    cases = [_sim_case(100, 100.0, 0.30, 0.16, 120.0, 100.0, 0.25, 0.2549),
             _sim_case(500, 560.0, 0.31, None, 125.0, 100.0, 0.25, 0.256)]
    assert _verdicts_sim(cases) == ["PASS:overhead", "FAIL:steady", "PASS:peak", "PASS:NDCG@10",
                                    "FAIL:overhead", "FAIL:peak", "FAIL:NDCG@10", "FAIL:wall", "PASS:500"]
    cases[1]["sim_s"] = 540.0  # 5.4× for 5×: within the 10 % tolerance
    assert _verdicts_sim(cases)[-2] == "PASS:wall"
    cases[1]["peak_rss_mb"] = 24 * 1024.0  # not below the 24 GiB limit
    assert _verdicts_sim(cases)[-1] == "FAIL:500"
    check = {"stores": 500, "peak_rss_mb": 30_000.0, "memory_limit_mb": 24 * 1024, "fits": False}
    assert _verdicts_sim(cases[:1], check)[-1] == "FAIL:500"


def test_bench_validate_counts_every_line(capsys):
    assert main(["bench", "validate", "--lines", "20000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tx = result["transactions"]
    assert result["lines"] == tx["rows_in"] == 20000
    assert tx["rows_in"] == tx["accepted"] + sum(tx["excluded"].values()) + sum(tx["quarantined"].values())
    assert result["rows_per_s"] > 0 and result["peak_rss_mb"] > 0


SIM_KEYS = {"stores", "sim_s", "plain_s", "overhead", "bytes_per_store_round", "peak_rss_mb",
            "steady_overhead", "startup_s", "prior_s"}


def test_bench_sim_phases_and_steady_overhead_by_hand():
    from simulations.bench.sim import phases, steady_overhead

    # started 0, first task at 2, rounds end at 5, 7, 10, everything stopped at 11
    assert phases(0.0, 2.0, [5.0, 7.0, 10.0], 11.0) == {"startup_s": 2.0, "prior_s": 0.0, "round_s": [3.0, 2.0, 3.0],
                                                         "shutdown_s": 1.0}
    # with an explore-prior step ending at 4: round 1 runs 4 → 5
    assert phases(0.0, 2.0, [5.0, 7.0], 8.0, prior_end=4.0) == {
        "startup_s": 2.0, "prior_s": 2.0, "round_s": [1.0, 2.0], "shutdown_s": 1.0}
    # rounds after the first: (2 + 3) / 2 = 2.5 s against (1 + 2) / 2 = 1.5 s
    assert abs(steady_overhead([9.0, 2.0, 3.0], [4.0, 1.0, 2.0]) - (2.5 / 1.5 - 1)) < 1e-12
    assert steady_overhead([3.0], [2.0]) is None


def test_bench_sim_dispatch_medians_by_hand():
    from simulations.bench.sim import dispatch_ms

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
    # The explore-prior release (round 0) is timed apart from round 1.
    assert case["prior_s"] > 0
    assert abs(case["startup_s"] + case["prior_s"] + sum(case["round_s"]) + case["shutdown_s"]
               - case["sim_s"]) < 0.05
    # A float32 reply holds every parameter: at least 4 bytes each of the generated catalog's model.
    from common.data.dataset import ItemIndex
    from common.learning.model import Recommender
    from common.data.storefiles import read_catalog
    from simulations.bench.sim import QUICK, chain_for

    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_for(QUICK["stores"][0], QUICK["members"]))))
    params = sum(v.numel() for v in model.state_dict().values())
    assert 4 * params <= case["bytes_per_store_round"] < 4 * params * 1.01
