"""CPU time and peak memory of process trees, read from /proc (no psutil on a store's machine).

A background thread samples, every ``every`` seconds, each root pid and everything below it:
cumulative user+system CPU seconds (/proc/PID/stat) and the kernel's own high-water mark of
resident memory (VmHWM in /proc/PID/status, so a peak between two samples is not missed).
Processes are grouped by a caller's classifier (e.g. "superlink", "serverapp").
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

from simulations.deploy.processes import descendants

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM) in MiB, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler:
    """Samples the trees under ``roots``; ``classify(pid, cmdline)`` names each process's group."""

    def __init__(self, roots: list[int], classify: Callable[[int, str], str], every: float = 0.5) -> None:
        self.roots, self.classify, self.every = roots, classify, every
        self.group: dict[int, str] = {}
        self.last_cpu: dict[int, float] = {}
        self.peak: dict[int, float] = {}
        # (time, {group: cumulative CPU seconds of every process of the group seen so far})
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "Sampler":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        for root in self.roots:
            for pid in (root, *descendants(root)):
                cpu = cpu_seconds(pid)
                if cpu is None:
                    continue
                if pid not in self.group:
                    self.group[pid] = self.classify(pid, cmdline(pid))
                self.last_cpu[pid] = cpu  # a process that exits keeps its last reading
                peak = peak_rss_mb(pid)
                if peak is not None:
                    self.peak[pid] = max(self.peak.get(pid, 0.0), peak)
        totals: dict[str, float] = {}
        for pid, cpu in self.last_cpu.items():
            totals[self.group[pid]] = totals.get(self.group[pid], 0.0) + cpu
        self.samples.append((time.time(), totals))

    def cpu_between(self, group: str, start: float, end: float) -> float:
        """CPU seconds ``group`` used between two times (to the nearest samples)."""
        def at(t: float) -> float:
            before = [s for s in self.samples if s[0] <= t]
            chosen = before[-1] if before else self.samples[0]
            return chosen[1].get(group, 0.0)
        return max(0.0, at(end) - at(start))

    def peak_mb(self, group: str) -> float:
        """The largest peak resident memory of one process of ``group`` (MiB)."""
        return max((mb for pid, mb in self.peak.items() if self.group.get(pid) == group), default=0.0)
