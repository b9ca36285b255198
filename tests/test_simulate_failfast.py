"""A simulation that cannot run ends soon with one clear message; SIGTERM ends it and
every process it started within 10 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_HOME": str(tmp_path / "flwr"),
            "STOREFED_CACHE": str(tmp_path / "cache"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def test_a_ray_address_with_nothing_there_ends_at_once_with_what_to_do(tmp_path):
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--stores", "3", "--rounds", "1",
                           "--ray-address", "127.0.0.1:1"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - began < 60
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("storefed: no Ray cluster at 127.0.0.1:1: start one with `ray start --head` "
                                   "or drop --ray-address")
    assert "Traceback" not in proc.stderr


def test_a_malformed_ray_address_is_named():
    from simulations.simulate import SimulationError, _probe

    with pytest.raises(SimulationError, match="'nonsense' is not host:port"):
        _probe("nonsense")


def _tree(root: int) -> list[int]:
    from simulations.deploy.processes import descendants

    return descendants(root)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_simulation_and_every_process_it_started_within_10_s(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", "--stores", "2", "--rounds", "50",
                             "--out", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")],
                            cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, started = time.monotonic() + 90, []
        while time.monotonic() < deadline and proc.poll() is None:
            started = _tree(proc.pid)
            names = set()
            for pid in started:
                try:
                    names.add(Path(f"/proc/{pid}/comm").read_text().strip())
                except OSError:
                    pass
            if "raylet" in names and any(n.startswith("ray::") or "ClientAppActor" in n for n in names):
                break
            time.sleep(0.5)
        assert proc.poll() is None and started, "the simulation did not get its Ray workers up in 90 s"
        started = _tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        proc.wait(timeout=10)
        assert time.monotonic() - began < 10
        assert proc.returncode == 128 + signal.SIGTERM
        time.sleep(0.5)
        assert [p for p in started if _alive(p)] == []
    finally:
        if proc.poll() is None:
            for pid in _tree(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.kill()
            proc.wait()
