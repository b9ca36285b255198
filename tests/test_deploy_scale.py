"""``storefed bench deploy`` on a real SuperLink (TLS, node authentication), kept small: 3
lightweight stores, 2 rounds, and the round-timeout fault — the last store answers round 2
after round-timeout-s, so the round finishes without it and the server names it.

Checks the JSON contract and that the measured figures agree with one another (no timings
asserted: speed lives in the benchmark's results, simulations/results/deploy-scale/).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from simulations.bench.deploy import CASE_KEYS
from simulations.cli import main

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc)"),
    pytest.mark.usefixtures("deployment_binaries"),
]

ROUND_TIMEOUT_S = 20.0  # a healthy lightweight store answers in a few seconds, even on a busy machine
LATE_S = ROUND_TIMEOUT_S + 5.0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-deploy") / "run"
    argv = ["bench", "deploy", "--stores", "3", "--rounds", "2", "--real-daemons", "0", "--workers", "1",
            "--timeout", "180", "--round-timeout", str(ROUND_TIMEOUT_S), "--straggler-s", str(LATE_S),
            "--out", str(out), "--json"]
    capture = pytest.MonkeyPatch()
    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        code = main(argv)
    finally:
        capture.undo()
    assert code == 0
    return json.loads(buffer.getvalue())


def _results(case: dict) -> dict:
    return json.loads((Path(case["work_dir"]) / "run" / "results.json").read_text())


def test_the_json_holds_the_contract_keys_and_consistent_figures(bench):
    (case,) = bench["cases"]
    assert set(CASE_KEYS) <= set(case)
    assert case["stores"] == 3 and case["real_daemons"] == 0 and case["light_clients"] == 3
    assert case["flower_status"] == "finished:completed" and case["left_running"] == []
    assert 0 <= case["server_overhead_s"] <= case["round_s"]
    assert case["superlink_peak_mb"] > 0 and case["serverapp_peak_mb"] > 0
    assert case["superlink_cpu_s_per_round"] > 0
    one, two = case["per_round"]
    # What the lightweight stores pushed is what the ServerApp counted in their replies
    # (results.json's bytes_per_store: the reply's content in Flower's wire format), within
    # the objects' own headers; round 2 counts two replies (the straggler's came too late).
    per_store = one["light_bytes_out"] / 3
    assert per_store == pytest.approx(two["light_bytes_out"] / 2, rel=0.01)
    results = _results(case)
    assert per_store == pytest.approx(results["per_round"][0]["bytes_per_store"], rel=0.05)
    # Every store pulled the same model: a round's bytes out are one model per store counted.
    assert one["light_bytes_in"] / 3 == pytest.approx(two["light_bytes_in"] / 2, rel=0.01)
    assert one["light_bytes_in"] > 0


def test_a_straggler_past_round_timeout_is_dropped_from_that_round_and_named(bench):
    (case,) = bench["cases"]
    late = "L0003"
    assert case["stragglers"] == {late: {"2": LATE_S}}
    assert case["participated"] == [3, 2]
    assert late in case["failed_stores"]
    log = open(case["run_log"]).read()
    assert f"store {late} failed in round 2: no reply within the round timeout" in log
    assert "round 2: trained L0001, L0002 · failed L0003" in log
    # Dropped from round 2 only: it trained round 1 with the others.
    assert [f["round"] for f in _results(case)["failures"] if f["store"] == late] == [2]
