"""Privacy accounting, checked against Google's dp-accounting (an independent PLD accountant)."""

from __future__ import annotations

import multiprocessing

import pytest

from client.state.ledger import append_event, ledger_path, read_events
from common.privacy import accountant as privacy
from common.privacy.ledger import LedgerError, PrivacyEvent
from simulations.bench.privacy import SETTINGS

DELTA = 1e-6
# Opacus' PRV accountant reports the upper end of its estimate (eps_error 0.01): ours − PLD
# measured 0.0101–0.0111 in every setting below. A band of 0.02 above the reference fails
# an accountant that under-reports by 1 % (1 % of the smallest ε here, 2.12, is 0.021).
ABOVE_PLD = 0.02


def pld_epsilon(history, delta=DELTA) -> float:
    """ε of the composed history by dp-accounting's PLD accountant (the outside reference),
    built here from dp-accounting's own events, not through any storefed code."""
    import dp_accounting as dpa

    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), t) for s, q, t in history]
    return dpa.pld.PLDAccountant().compose(dpa.ComposedDpEvent(events)).get_epsilon(delta)


def assert_tight_upper_bound(ours: float, reference: float) -> None:
    assert reference <= ours <= reference + ABOVE_PLD, (ours, reference)


@pytest.mark.parametrize("sigma,q,steps,rounds", SETTINGS)
def test_ledger_epsilon_is_a_tight_upper_bound_of_the_pld_reference(sigma, q, steps, rounds):
    history = [(sigma, q, steps)] * rounds
    ours = privacy.epsilon(history, DELTA, "prv")
    # The reference composes one event of all steps: composition over rounds is checked too.
    reference = pld_epsilon([(sigma, q, steps * rounds)])
    assert_tight_upper_bound(ours, reference)
    # An accountant 1 % low would fail the band (the band is tight enough to catch it).
    with pytest.raises(AssertionError):
        assert_tight_upper_bound(0.99 * ours, reference)


def test_rdp_is_selectable_and_not_tighter_than_prv():
    history = [(1.0, 0.05, 20)] * 5
    assert privacy.epsilon(history, DELTA, "rdp") >= privacy.epsilon(history, DELTA, "prv")
    with pytest.raises(ValueError, match="unknown accountant"):
        privacy.epsilon(history, DELTA, "gdp")


def _event(run_id, rnd, sigma=1.1, q=0.08, steps=13):
    return PrivacyEvent(run_id=run_id, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps,
                        clip_norm=1.0, accountant="prv", at="2026-01-01T00:00:00+00:00", delta=DELTA)


def test_two_runs_of_three_rounds_equal_one_run_of_six(tmp_path):
    import json

    from client.state.privacy_report import privacy_report

    store = tmp_path / "stores" / "S1"
    store.mkdir(parents=True)
    (store / "store.json").write_text(json.dumps({"store_id": "S1", "name": "n", "region": "r", "opened": "2020-01-01"}))
    for rnd in (1, 2, 3):
        append_event(tmp_path / "two", "S1", _event("run-a", rnd))
    for rnd in (1, 2, 3):
        append_event(tmp_path / "two", "S1", _event("run-b", rnd))
    two = [e.mechanism() for e in read_events(tmp_path / "two", "S1")]
    assert two == [(1.1, 0.08, 13)] * 6
    # What the store reports over its whole ledger (`storefed privacy`), against the PLD of
    # 6 × 13 steps computed outside: a report that counted only the latest run (3 × 13
    # steps, ε far lower) or only the first round of each run fails the band.
    reported = privacy_report(store, tmp_path / "two")["epsilon"]
    six, three = pld_epsilon([(1.1, 0.08, 78)]), pld_epsilon([(1.1, 0.08, 39)])
    assert_tight_upper_bound(reported, six)
    assert three + ABOVE_PLD < six  # the band tells the two apart


def test_merging_equal_settings_changes_no_epsilon():
    history = [(1.1, 0.08, 13), (0.9, 0.08, 13), (1.1, 0.08, 13)]
    assert privacy.merge_history(history) == [(1.1, 0.08, 26), (0.9, 0.08, 13)]
    # RDP composes by adding RDP curves, so the merged and unmerged histories agree exactly.
    from opacus.accountants import RDPAccountant
    acc = RDPAccountant()
    acc.history = history
    assert privacy.epsilon(history, DELTA, "rdp") == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.125, 80), (4.0, 0.05, 200), (1.0, 0.25, 40)])
def test_calibrated_noise_lands_between_90_and_100_percent_of_the_target(target, q, steps):
    sigma = privacy.calibrate_noise(target, DELTA, q, steps)
    reached = privacy.epsilon([(sigma, q, steps // 10)] * 10, DELTA)
    assert 0.9 * target <= reached <= target
    assert 0.9 * target <= pld_epsilon([(sigma, q, steps)]) <= target * 1.001


def test_delta_follows_the_store_size():
    assert privacy.store_delta(100) == 1e-6
    assert privacy.store_delta(500_000) == pytest.approx(1 / 5_000_000)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit", "drop_middle", "wrong_store"])
def test_a_damaged_ledger_is_an_error_naming_the_file(tmp_path, damage):
    for rnd in (1, 2, 3):
        append_event(tmp_path, "S1", _event("r", rnd))
    path = ledger_path(tmp_path)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    store = "S1"
    if damage == "truncate":
        path.write_text(text[: len(text) - 17])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not a ledger")
    elif damage == "edit":  # someone lowers σ's record of spending
        path.write_text(text.replace('"steps": 13', '"steps": 1', 1))
    elif damage == "drop_middle":
        path.write_text("".join(lines[:2] + lines[3:]))
    else:
        store = "S2"
    with pytest.raises(LedgerError, match=str(path)):
        read_events(tmp_path, store)


APPENDS = 15


def _append_many(state_dir, worker, barrier):
    for rnd in range(APPENDS):
        barrier.wait(timeout=60)  # both processes append each round at the same moment
        append_event(state_dir, "S1", _event(f"w{worker}", rnd))


def test_two_processes_appending_at_once_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(tmp_path, w, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    events = read_events(tmp_path, "S1")
    assert sorted((e.run_id, e.round) for e in events) == sorted((f"w{w}", r) for w in (0, 1) for r in range(APPENDS))
    # The barrier made the appends overlap: neither worker ever got two records ahead of
    # the other, so the ledger interleaves them (it is not one worker's run, then the other's).
    for k in range(1, APPENDS + 1):
        prefix = [e.run_id for e in events[: 2 * k]]
        assert abs(prefix.count("w0") - prefix.count("w1")) <= 1, prefix
