"""Real Flower processes on loopback (storefed local-deploy, the deployment test): start, wait, stop by pid.

Every process is started in its own session, so its pid is also its process group id.
Stopping one stops exactly the processes this harness started and the ones Flower started
under them (SuperExec, ServerApp, ClientApp), found through /proc by parent pid; nothing
is ever looked up by name, because other people's Flower processes share the machine.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live next to python


def free_port(low: int = 40000, high: int = 49999) -> int:
    """A TCP port in [low, high] that nothing on loopback listens on right now."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile, or half-read
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children before grandchildren (the order to stop them in)."""
    tree = _children()
    found: list[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(tree.get(child, []))
    return found


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when it is gone. A pid and its
    start time name one process even if the pid number is later reused by another."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has already exited


def alive(pid: int, started: int | None = None) -> bool:
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f}s for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    family: dict[int, int] = field(default_factory=dict)  # pid → start time of every process seen under it

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def remember_family(self) -> None:
        for pid in descendants(self.pid):
            started = start_time(pid)
            if started is not None:
                self.family.setdefault(pid, started)


class Processes:
    """The processes of one test; :meth:`stop_all` ends every one of them."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.procs = logs, env, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> Proc:
        log = log or self.logs / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**self.env, **(env or {})}, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a started process, its process group and everything below it."""
        proc = self.procs[name]
        proc.remember_family()
        if proc.popen.poll() is None:  # not yet reaped: its pid is still its own group's id
            _signal_group(proc.pid, sig)
        for pid, started in proc.family.items():
            _signal(pid, sig, started)
        try:
            proc.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=5)

    def stop_all(self) -> list[int]:
        """SIGTERM, then SIGKILL after a grace period, to every started process and its
        descendants; returns the pids still alive afterwards (should be none)."""
        for proc in self.procs.values():
            proc.remember_family()
        everyone = {pid: started for p in self.procs.values() for pid, started in p.family.items()}
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        for pid, started in everyone.items():  # Flower starts some helpers in sessions of their own
            _signal(pid, signal.SIGTERM, started)
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(pid, started) for pid, started in everyone.items()):
            time.sleep(0.2)
        for pid, started in everyone.items():
            _signal(pid, signal.SIGKILL, started)
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
                try:
                    proc.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        time.sleep(0.5)
        left = {pid: started for pid, started in everyone.items() if alive(pid, started)}
        left.update({p.pid: 0 for p in self.procs.values() if p.popen.poll() is None})
        return sorted(left)


def stop_recorded(recorded: dict[int, int | None], grace_s: float = 10.0) -> list[int]:
    """Stop processes known only by (pid → start time), e.g. from a deployment.json written
    by another process: SIGTERM to each one's group and everything below it, then SIGKILL
    after ``grace_s``. A pid whose start time no longer matches is someone else's and is
    left alone. Returns the pids still alive afterwards (should be none)."""
    everyone = {pid: started for pid, started in recorded.items() if alive(pid, started)}
    for pid in list(everyone):
        for child in descendants(pid):
            child_started = start_time(child)
            if child_started is not None:
                everyone.setdefault(child, child_started)
    for pid, started in everyone.items():
        if pid in recorded and alive(pid, started) and _leads_group(pid):
            _signal_group(pid, signal.SIGTERM)
        _signal(pid, signal.SIGTERM, started)
    deadline = time.time() + grace_s
    while time.time() < deadline and any(alive(pid, started) for pid, started in everyone.items()):
        time.sleep(0.2)
    for pid, started in everyone.items():
        _signal(pid, signal.SIGKILL, started)
    time.sleep(0.3)
    return sorted(pid for pid, started in everyone.items() if alive(pid, started))


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _signal(pid: int, sig: int, started: int) -> None:
    """Signal ``pid`` only if it is still the process that started at ``started``."""
    if not alive(pid, started):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
