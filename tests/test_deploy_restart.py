"""The SuperLink killed mid-run (SIGKILL, its ServerApp with it) and restarted on its state
database: the stores rejoin with the same keys and a signed ``resume=true`` run continues from
the last checkpoint to the model an uninterrupted run gives.

Real processes on loopback (simulations/bench/deploy.py's Loopback: TLS, SuperNode
authentication, a SQLite state database) with three lightweight stores, whose replies are a
function of store, round and model (simulations/bench/fleet_clients.py), so the two runs can
be compared weight for weight. A real store's noise never repeats; its ledger across a
server stop is test_deploy.py's.
"""

from __future__ import annotations

import json
import sys

import pytest

from simulations.deploy.processes import wait_for

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc)"),
    pytest.mark.usefixtures("deployment_binaries"),
]

WAIT_S = 300.0


def test_a_killed_and_restarted_superlink_resumes_to_the_uninterrupted_model(tmp_path):
    import torch

    from simulations.bench.deploy import Loopback

    link = Loopback(tmp_path / "deployment", 3, [], ["L0001", "L0002", "L0003"], "file")
    left: list[int] = []
    try:
        link.start_superlink()
        link.start_stores(1, {}, WAIT_S)

        def settings(name: str, *extra: str) -> str:
            return " ".join([link.settings(2, tmp_path / name, WAIT_S, 60.0),
                             f"checkpoint-dir='{tmp_path / ('ckpt-' + name if name == 'whole' else 'ckpt')}'",
                             *extra])

        whole = link.start_run("whole", settings("whole"))
        whole.popen.wait(timeout=WAIT_S)
        assert link.status(whole) == "finished:completed", whole.text()[-2000:]

        cut = link.start_run("cut", settings("cut"))
        checkpoint = tmp_path / "ckpt" / "checkpoint.pt"
        wait_for(lambda: checkpoint.exists() or cut.popen.poll() is not None, WAIT_S, "round 1's checkpoint")
        assert cut.popen.poll() is None, cut.text()[-2000:]  # round 2 is under way
        link.procs.kill("superlink")  # SIGKILL: the SuperLink and the run's ServerApp below it
        link.procs.kill("cut")
        assert not (tmp_path / "cut" / "results.json").exists()

        link.start_superlink("superlink-restarted")  # same port, same state database
        resumed = link.start_run("resumed", settings("resumed", "resume=true"))
        resumed.popen.wait(timeout=WAIT_S)
        assert link.status(resumed) == "finished:completed", resumed.text()[-2000:]
        results = json.loads((tmp_path / "resumed" / "results.json").read_text())
        assert results["checkpoint"]["resumed_from"] == 1 and [r["round"] for r in results["per_round"]] == [1, 2]
        assert results["per_round"][-1]["participated"] == 3  # every store rejoined the restarted SuperLink
        assert "explore_prior" not in results  # the prior came back in the checkpoint's model
        a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
        b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
        assert a.keys() == b.keys()
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
        # The stores never restarted: their registrations outlived the SuperLink in its database.
        assert link.light()["activated"] >= 3
    finally:
        left = link.procs.stop_all()
    assert left == []
