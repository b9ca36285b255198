"""`storefed bench dp`: what DP-SGD costs per step, against plain training.

For each catalog size: the real model, one realistic batch (256 members, 50 history items
each), one optimizer step timed after warm-up (median of repeats), plain and with Opacus
ghost clipping. Each (catalog, mode) runs in its own process, so its peak memory is its
own: the growth of resident memory from just before the first step to the peak.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np

TARGET_RATIO = 1.5
TARGET_MEMORY_RATIO = 1.3


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _batch(catalog: int, batch: int, history: int, seed: int = 0):
    from common.dataset import HISTORY_FEATURES, PROFILE_DIM, Examples, ItemIndex

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


def time_steps(catalog: int, mode: str, batch: int = 256, history: int = 50, repeats: int = 15,
               warmup: int = 3) -> dict:
    """Median step time (ms) and peak memory growth (MB) of one mode ("plain" or "dp")."""
    import warnings

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from common.model import BasketLoss, Recommender
    from common.training import batch_tensors

    torch.set_num_threads(2)
    torch.manual_seed(0)
    items, ex = _batch(catalog, batch, history)
    model = Recommender(items)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = BasketLoss()
    *inputs, t_items, t_mask = batch_tensors(ex, np.arange(batch))
    if mode == "dp":
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, criterion, _ = PrivacyEngine(accountant="prv").make_private(
                module=model, optimizer=optimizer, criterion=criterion,
                data_loader=DataLoader(TensorDataset(torch.arange(batch)), batch_size=batch),
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ghost")
    start_rss = _rss_mb()
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(*inputs), t_items, t_mask)
            loss.backward()
            optimizer.step()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_ms": float(np.median(times)), "peak_mb": max(peak - start_rss, 0.0)}


def _run_case(catalog: int, mode: str, quick: bool) -> dict:
    args = dict(batch=32, history=10, repeats=3, warmup=1) if quick else {}
    code = ("import json, sys; from simulations.bench_dp import time_steps; "
            f"print(json.dumps(time_steps({catalog}, {mode!r}, **{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_dp(catalogs: list[int], quick: bool = False) -> dict:
    """The `storefed bench dp --json` object."""
    cases = []
    for catalog in catalogs:
        plain, dp = _run_case(catalog, "plain", quick), _run_case(catalog, "dp", quick)
        cases.append({
            "catalog": catalog,
            "plain_step_ms": round(plain["step_ms"], 2), "dp_step_ms": round(dp["step_ms"], 2),
            "ratio": round(dp["step_ms"] / plain["step_ms"], 3),
            "plain_peak_mb": round(plain["peak_mb"], 1), "dp_peak_mb": round(dp["peak_mb"], 1),
            "memory_ratio": round(dp["peak_mb"] / max(plain["peak_mb"], 1e-9), 3),
        })
    return {"cases": cases, "targets": {"ratio": TARGET_RATIO, "memory_ratio": TARGET_MEMORY_RATIO, "at_catalog": 10000},
            "batch": 32 if quick else 256, "quick": quick}
