"""`storefed bench dp`: what DP-SGD costs per step, against plain training.

For each catalog size: the real model, one realistic batch (256 members, 50 history items
each), one optimizer step (forward, backward, Adam) after warm-up, median of repeats, for

* ``plain``: no DP;
* ``dp``: DP-SGD as simulated stores run it (the one-pass book-keeping path, :mod:`common.learning.dp_fast`,
  noise from the seeded torch generator);
* ``secure``: the same path as deployed stores run it, noise from the ChaCha20 stream
  (:mod:`common.privacy.secure_noise`: four Box–Muller normals summed per coordinate);
* ``opacus``: Opacus' ghost clipping, the previous path, for reference.

Time: the modes step in turn inside one process (plain, dp, opacus, plain, ...), so
load from other processes on a shared machine hits them alike. Memory: each (catalog,
mode) runs alone in its own process; its peak is the growth of resident memory from just
before the first step to the process' peak (with glibc's mmap threshold fixed, see below).

Threads: 1 by default, as in simulation (one store per core); ``threads`` changes it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

TARGET_RATIO = 1.5
TARGET_MEMORY_RATIO = 1.3
TARGET_CATALOG = 10_000
MODES = ("plain", "dp", "secure", "opacus")
FULL = dict(batch=256, history=50, repeats=15, warmup=3)
QUICK = dict(batch=32, history=10, repeats=3, warmup=1)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _batch(catalog: int, batch: int, history: int, seed: int = 0):
    from common.data.dataset import HISTORY_FEATURES, PROFILE_DIM, Examples, ItemIndex

    rng = np.random.default_rng(seed)
    items = ItemIndex(item_ids=np.array([f"I{i}" for i in range(catalog)]), category=rng.integers(0, 40, catalog),
                      brand=rng.integers(0, 200, catalog), n_categories=40, n_brands=200)
    profile = np.zeros((batch, PROFILE_DIM), np.float32)
    profile[np.arange(batch), rng.integers(0, PROFILE_DIM, batch)] = 1.0
    ex = Examples(
        hist_items=rng.integers(0, catalog, (batch, history)),
        hist_feat=rng.random((batch, history, HISTORY_FEATURES), dtype=np.float32),
        hist_mask=np.ones((batch, history), np.float32),
        profile=profile,
        target_items=rng.integers(0, catalog, (batch, 20)),
        target_mask=(rng.random((batch, 20)) < 0.3).astype(np.float32),
    )
    return items, ex


def _stepper(mode: str, items, ex, batch: int):
    """A function doing one optimizer step of ``mode`` on the fixed batch."""
    import warnings

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from common.learning.model import BasketLoss, Recommender
    from common.learning.training import batch_tensors

    torch.manual_seed(0)
    model = Recommender(items)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = BasketLoss()
    loader = DataLoader(TensorDataset(torch.arange(batch)), batch_size=batch)
    *inputs, t_items, t_mask = batch_tensors(ex, np.arange(batch))
    if mode in ("dp", "secure"):
        from common.learning import dp_fast
        from common.privacy.secure_noise import SecureRandom

        model, optimizer, criterion = dp_fast.make_private(
            model, optimizer, criterion, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=batch,
            noise_generator=torch.Generator().manual_seed(1) if mode == "dp" else SecureRandom())
    elif mode == "opacus":
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, criterion, _ = PrivacyEngine(accountant="prv").make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ghost")
    elif mode != "plain":
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(*inputs), t_items, t_mask)
        loss.backward()
        optimizer.step()

    return step


def time_modes(catalog: int, modes: tuple[str, ...] = MODES, batch: int = 256, history: int = 50,
               repeats: int = 15, warmup: int = 3, threads: int = 1) -> dict[str, float]:
    """Median step time (ms) of each mode, the modes stepping in turn in this process."""
    import warnings

    import torch

    torch.set_num_threads(threads)
    items, ex = _batch(catalog, batch, history)
    steppers = {m: _stepper(m, items, ex, batch) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(warmup + repeats):
            for m in modes:
                t0 = time.perf_counter()
                steppers[m]()
                if i >= warmup:
                    times[m].append((time.perf_counter() - t0) * 1000)
    return {m: float(np.median(t)) for m, t in times.items()}


def peak_memory(catalog: int, mode: str, batch: int = 256, history: int = 50, repeats: int = 15,
                warmup: int = 3, threads: int = 1) -> float:
    """Peak resident-memory growth (MB) of ``mode``'s steps; call in a fresh process."""
    import warnings

    import torch

    torch.set_num_threads(threads)
    items, ex = _batch(catalog, batch, history)
    step = _stepper(mode, items, ex, batch)
    start = _rss_mb()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(min(warmup + repeats, 5)):  # the peak is reached in the first steps
            step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(peak - start, 0.0)


def _in_subprocess(call: str) -> object:
    code = f"import json; from simulations.bench.dp import *; print(json.dumps({call}))"
    # A fixed mmap threshold: every large tensor is its own mapping, returned on free, so
    # resident memory follows live tensors. With glibc's adaptive threshold, freed blocks
    # stay cached and the same run's peak varied by ±40%.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_dp(catalogs: list[int], quick: bool = False, threads: int = 1) -> dict:
    """The `storefed bench dp --json` object."""
    shape = {**(QUICK if quick else FULL), "threads": threads}
    cases = []
    for catalog in catalogs:
        ms = _in_subprocess(f"time_modes({catalog}, **{shape!r})")
        mb = {m: _in_subprocess(f"peak_memory({catalog}, {m!r}, **{shape!r})") for m in ("plain", "dp")}
        cases.append({
            "catalog": catalog,
            "plain_step_ms": round(ms["plain"], 2), "dp_step_ms": round(ms["dp"], 2),
            "ratio": round(ms["dp"] / ms["plain"], 3),
            "plain_peak_mb": round(mb["plain"], 1), "dp_peak_mb": round(mb["dp"], 1),
            "memory_ratio": round(mb["dp"] / max(mb["plain"], 1e-9), 3),
            "opacus_step_ms": round(ms["opacus"], 2), "opacus_ratio": round(ms["opacus"] / ms["plain"], 3),
            "secure_step_ms": round(ms["secure"], 2), "secure_ratio": round(ms["secure"] / ms["plain"], 3),
        })
    return {"cases": cases,
            "targets": {"ratio": TARGET_RATIO, "memory_ratio": TARGET_MEMORY_RATIO, "at_catalog": TARGET_CATALOG},
            "batch": shape["batch"], "history": shape["history"], "threads": threads, "quick": quick,
            "dp_path": "bookkeeping (common.learning.dp_fast); secure_* = the same with ChaCha20 noise "
                       "(deployed stores); opacus_* = Opacus ghost clipping"}


def verdicts(result: dict) -> list[str]:
    """PASS/FAIL lines for the targets at the target catalog (if it was measured)."""
    lines = []
    t = result["targets"]
    for c in result["cases"]:
        if c["catalog"] != t["at_catalog"]:
            continue
        for key in ("ratio", "memory_ratio"):
            ok = c[key] <= t[key]
            lines.append(f"{'PASS' if ok else 'FAIL'}: {key} {c[key]:.2f} at catalog {c['catalog']} (target ≤ {t[key]})")
    return lines or [f"no case at catalog {t['at_catalog']}: targets not checked"]
