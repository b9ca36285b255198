"""The runs the operator's dashboard shows: found, summarised and read lazily. No web here.

A directory given with ``--runs`` is a run itself (it holds ``results.json``, as written by
`storefed simulate --out` and `storefed train`), a benchmark's results (``results.json``
with ``methods``, and ``report.md`` with its PNGs), or a folder of either (its direct
subdirectories are looked at). A subdirectory with a ``checkpoint/`` but no results is a
run that is still going or that crashed.

Listing costs one ``scandir`` per folder and one ``stat`` per run; a ``results.json`` is
parsed only when it is new or changed (by size, mtime and inode), and only its summary is
kept, so the list of 100 runs of 500 stores does not parse 100 files per request. A whole
run is read when its page is asked for, and the last few are kept. A damaged
``results.json`` (not JSON, not a storefed result, not readable) is a run whose status
says what is wrong, never an error of the page.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

RESULTS = "results.json"
REPORT = "report.md"
CHECKPOINT = "checkpoint"
RESCAN_S = 2.0  # a listing within this many seconds of the last one reuses it
KEEP_LOADED = 8  # whole runs kept in memory for their pages


class RunsError(Exception):
    """A ``--runs`` directory that cannot be used; the message is one line naming it."""


class DamagedRun(Exception):
    """A run whose ``results.json`` cannot be used; the message says why, in one line."""


@dataclass
class Summary:
    """One row of the runs list."""

    key: str  # its id in the dashboard's paths (stable: a digest of the directory)
    path: str
    name: str
    kind: str  # "run", "benchmark", "report" (a report.md only) or "incomplete"
    status: str  # "complete", "stopped early: …", "damaged: …", "no results yet (running, or crashed)"
    when: str | None = None  # when the run finished (or the file was last written)
    signed_by: str | None = None
    strategy: str | None = None
    stores: int | None = None
    rounds: int | None = None  # rounds asked for
    rounds_done: int | None = None
    epsilon_min: float | None = None
    epsilon_max: float | None = None
    dp: bool | None = None
    stamp: tuple = field(default=(), repr=False)  # (size, mtime_ns, inode) of results.json when summarised

    @property
    def damaged(self) -> bool:
        return self.status.startswith("damaged")


def run_key(path: Path) -> str:
    """The stable id of a run directory in the dashboard's paths."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def _iso_mtime(seconds: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def check_roots(roots: Iterable[Path | str]) -> list[Path]:
    """The ``--runs`` directories, resolved; RunsError naming the first that is not a directory."""
    out = []
    for root in roots:
        path = Path(root).expanduser()
        if not path.exists():
            raise RunsError(f"{path}: runs directory not found (--runs takes a run's --out directory, or a folder of them)")
        if not path.is_dir():
            raise RunsError(f"{path}: not a directory (--runs takes a run's --out directory, or a folder of them)")
        out.append(path.resolve())
    if not out:
        raise RunsError("no runs directory given (--runs DIR)")
    return out


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def read_results(path: Path) -> dict:
    """A ``results.json`` as a dict; DamagedRun with one line saying why it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DamagedRun(f"{path.name} is not UTF-8 text") from None
    except OSError as exc:
        raise DamagedRun(f"{path.name} cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedRun(f"{path.name} is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise DamagedRun(f"{path.name} holds a JSON {type(data).__name__}, not an object")
    return data


def kind_of(data: dict) -> str:
    """"run" or "benchmark"; DamagedRun when the object is neither."""
    if isinstance(data.get("per_round"), list) and isinstance(data.get("privacy"), dict):
        return "run"
    if isinstance(data.get("methods"), dict) and isinstance(data.get("settings"), dict):
        return "benchmark"
    raise DamagedRun(f"{RESULTS} is not a storefed result (neither per_round and privacy of a run, nor the "
                     "methods and settings of a benchmark)")


def summarise(path: Path, data: dict, mtime: float) -> Summary:
    """The list row of one results object (``path`` its directory); DamagedRun when its
    content does not have the shape of one."""
    key, name = run_key(path), path.name
    kind = kind_of(data)
    try:
        if kind == "benchmark":
            settings = data["settings"]
            eps = [float(e) for e in settings.get("epsilons", [])]
            return Summary(key, str(path), name, kind, "complete", when=_iso_mtime(mtime),
                           strategy="benchmark" + (f" ({settings['dataset']})" if settings.get("dataset") else ""),
                           stores=int(settings.get("stores", 0)), rounds=int(settings.get("rounds", 0)),
                           rounds_done=int(settings.get("rounds", 0)),
                           epsilon_min=min(eps, default=None), epsilon_max=max(eps, default=None), dp=True)
        privacy = data["privacy"]
        eps = [float(p["epsilon"]) for p in privacy.values() if isinstance(p, dict) and p.get("epsilon") is not None]
        stopped = data.get("stopped")
        failures = data.get("failures") or []
        status = f"stopped early: {stopped}" if stopped else "complete"
        if not stopped and failures:
            status = f"complete, {len(failures)} store-rounds refused or failed"
        return Summary(key, str(path), name, kind, status,
                       when=str(data.get("finished_at") or _iso_mtime(mtime)),
                       signed_by=data.get("signed_by"), strategy=data.get("strategy"),
                       stores=int(data.get("stores", 0)), rounds=int(data.get("rounds", 0)),
                       rounds_done=len(data["per_round"]), epsilon_min=min(eps, default=None),
                       epsilon_max=max(eps, default=None), dp=bool(data.get("dp", True)))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedRun(f"{RESULTS} has an unexpected shape ({exc.__class__.__name__}: {exc})") from None


class RunIndex:
    """The runs under the ``--runs`` directories; see the module docstring. Thread-safe."""

    def __init__(self, roots: Sequence[Path | str], cache_file: Path | None = None) -> None:
        self.roots = check_roots(roots)
        self.cache_file = Path(cache_file) if cache_file else None
        self._lock = threading.Lock()
        self._summaries: dict[str, Summary] = {}  # by directory path
        self._listed: list[Summary] = []
        self._listed_at = -1e9
        self._loaded: OrderedDict[str, tuple[tuple, dict]] = OrderedDict()
        self.parsed = 0  # results files parsed so far (for tests and the timing)
        self._read_cache()

    # -- discovery --------------------------------------------------------------------
    def _candidates(self) -> list[Path]:
        found: list[Path] = []
        for root in self.roots:
            if (root / RESULTS).exists() or (root / REPORT).exists():
                found.append(root)
                continue
            try:
                children = sorted((Path(e.path) for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")),
                                  key=lambda p: p.name)
            except OSError as exc:
                raise RunsError(f"{root}: cannot be listed ({exc.strerror})") from None
            for child in children:
                if (child / RESULTS).exists() or (child / REPORT).exists() or (child / CHECKPOINT).is_dir():
                    found.append(child)
        return found

    def _summary(self, path: Path) -> Summary:
        results = path / RESULTS
        stamp = _stamp(results)
        if stamp is None:
            if (path / REPORT).exists():
                return Summary(run_key(path), str(path), path.name, "report", "report only (no results.json)",
                               when=_iso_mtime((path / REPORT).stat().st_mtime))
            return Summary(run_key(path), str(path), path.name, "incomplete", "no results yet (running, or crashed)",
                           when=_iso_mtime(path.stat().st_mtime))
        known = self._summaries.get(str(path))
        if known is not None and known.stamp == stamp:
            return known
        self.parsed += 1
        try:
            summary = summarise(path, read_results(results), stamp[1] / 1e9)
        except DamagedRun as exc:
            summary = Summary(run_key(path), str(path), path.name, "run", f"damaged: {exc}",
                              when=_iso_mtime(stamp[1] / 1e9))
        summary.stamp = stamp
        self._summaries[str(path)] = summary
        return summary

    def list(self, fresh: bool = False) -> list[Summary]:
        """Every run, newest first (by ``when``); rescanned at most every RESCAN_S seconds."""
        with self._lock:
            if fresh or time.monotonic() - self._listed_at >= RESCAN_S:
                before = self.parsed
                rows = [self._summary(p) for p in self._candidates()]
                self._listed = sorted(rows, key=lambda s: (s.when or "", s.name), reverse=True)
                self._listed_at = time.monotonic()
                if self.parsed != before:
                    self._write_cache()
            return list(self._listed)

    def find(self, key: str) -> Summary | None:
        """The run of ``key`` (None: no such run)."""
        for summary in self.list():
            if summary.key == key:
                return summary
        return None

    def load(self, key: str) -> tuple[Summary, dict]:
        """(summary, the whole results object) of a run; KeyError for an unknown key,
        DamagedRun for a results file that cannot be used."""
        summary = self.find(key)
        if summary is None:
            raise KeyError(key)
        path = Path(summary.path) / RESULTS
        stamp = _stamp(path)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None and hit[0] == stamp:
                self._loaded.move_to_end(key)
                return summary, hit[1]
        data = read_results(path)
        kind_of(data)
        with self._lock:
            self._loaded[key] = (stamp, data)
            while len(self._loaded) > KEEP_LOADED:
                self._loaded.popitem(last=False)
        return summary, data

    # -- the summaries kept across restarts ------------------------------------------
    def _read_cache(self) -> None:
        if self.cache_file is None:
            return
        try:
            rows = json.loads(self.cache_file.read_text(encoding="utf-8"))
            for row in rows:
                row["stamp"] = tuple(row["stamp"])
                summary = Summary(**row)
                self._summaries[summary.path] = summary
        except (OSError, ValueError, TypeError, KeyError):
            self._summaries = {}  # a missing or stale cache only costs a parse

    def _write_cache(self) -> None:
        if self.cache_file is None:
            return
        try:
            from common.data.storefiles import atomic_write_text

            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.cache_file, json.dumps([asdict(s) for s in self._summaries.values()]))
        except OSError:
            pass  # the cache is an optimisation: a read-only home only makes a restart slower
