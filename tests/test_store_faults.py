"""A store under machine faults (issue 27): its disk fills up mid-round, its clock is hours off.

The full disk is a real one where the test may mount a tmpfs (root, Linux): the store's state
directory is a small tmpfs, filled to the last byte after training and before the ledger
commit. Elsewhere the same moment is reproduced by making the ledger's atomic write raise
ENOSPC, as the kernel would.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from client.client_app import handle_train, refuse_when_unusable
from client.run_authorization import RunNotAuthorized, authorize
from common.config import DEFAULTS, RunConfig
from common.exchange import wire
from common.privacy import run_signature as rs
from server.operator_key import load_operator_key, make_operator_key

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 4 MiB tmpfs (None when this machine does not let the test mount one)."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield None
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", f"storefed-test-{uuid.uuid4().hex[:8]}",
                           str(where)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)  # busy: detach it lazily


def _fill(directory: Path) -> None:
    """Write until the file system holding ``directory`` has no byte left (unbuffered)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 1):  # big blocks, then the last partial block byte by byte
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_disk_at_commit_sends_nothing_says_why_and_the_ledger_verifies(small_chain_dir, tmp_path, small_disk,
                                                                              monkeypatch):
    import client.dp_round as dp_round
    import common.data.storefiles as storefiles
    from client.state.ledger import read_events, read_ledger
    from test_client_reply import _deployed, _message
    from flwr.app import MessageType

    state = small_disk if small_disk is not None else tmp_path / "state"
    trained = dp_round.train_local

    def train_then_fill_the_disk(*args, **kwargs):
        result = trained(*args, **kwargs)
        if small_disk is not None:
            _fill(state)  # the reservation is on disk; the commit now meets a full disk
        else:
            def no_space(path, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            monkeypatch.setattr(storefiles, "atomic_write_bytes", no_space)
        return result

    monkeypatch.setattr(dp_round, "train_local", train_then_fill_the_disk)
    context = _deployed(small_chain_dir, state)
    msg = _message(small_chain_dir, MessageType.TRAIN)
    reply = refuse_when_unusable(msg, context, lambda: handle_train(msg, context, RunConfig.from_mapping(
        context.run_config)))
    # No weights leave: the store refuses, naming the file and the reason.
    assert reply.has_error() and reply.error.code == wire.REFUSE_CODE
    refusal = wire.parse_refusal(reply.error.reason)
    assert refusal["store-id"] == "S003"
    assert "privacy-ledger.jsonl: cannot be written (No space left on device)" in refusal["reason"]
    assert "sends nothing" in refusal["reason"]
    # The ledger on disk is the one before the commit: it verifies and counts the round as
    # spent (an open reservation: over-counted, never under-counted) until its operator clears it.
    monkeypatch.undo()
    ledger = read_ledger(state, "S003")
    assert read_events(state, "S003") == [] and [r.planned.round for r in ledger.open] == [1]
    if small_disk is not None:
        (state / "filler").unlink()  # space again: the next round trains and commits
        reply = handle_train(msg, context, RunConfig.from_mapping(context.run_config))
        assert not reply.has_error() and wire.TRAIN_ARRAYS in reply.content
        assert [e.round for e in read_events(state, "S003")] == [1]
        # The unconfirmed round stays counted until the operator clears it (storefed privacy).
        assert [r.planned.round for r in read_ledger(state, "S003").open] == [1]


OPERATOR_NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=timezone.utc)


def _store(tmp_path, chain, public) -> dict:
    return {"store-dir": str(chain / "stores" / "S001"), "catalog": str(chain), "state-dir": str(tmp_path / "state"),
            "operator-public-key": str(public)}


def _run(key, valid_for: timedelta, nonce: str) -> dict:
    config = {**DEFAULTS, "stores": 3}
    return {**config, **rs.sign(config, key, expires=OPERATOR_NOW + valid_for, nonce=nonce, fab_hash="ab" * 32)}


def test_a_store_clock_three_hours_off_judges_expiry_by_its_own_clock(tmp_path, small_chain_dir):
    """server/README.md "Store clocks": expiry is judged on the store's clock when it first sees the run."""
    private, public = make_operator_key(tmp_path / "op")
    key = load_operator_key(private)
    node = _store(tmp_path, small_chain_dir, public)
    ahead, behind = OPERATOR_NOW + timedelta(hours=3), OPERATOR_NOW - timedelta(hours=3)
    # 3 h fast, run valid 1 h (storefed train's default): the run has expired for this store,
    # and the refusal shows both times, so the operator sees the skew in the server's log.
    with pytest.raises(RunNotAuthorized, match=r"expired at 2026-12-02T13:00:00Z \(now 2026-12-02T15:00:00Z\)"):
        authorize(node, _run(key, timedelta(hours=1), "a" * 32), 1, ahead)
    # Signed for longer than the skew (--valid-for-min 240): accepted.
    assert authorize(node, _run(key, timedelta(hours=4), "b" * 32), 2, ahead).nonce == "b" * 32
    # 3 h slow: accepted (its 4 h to expiry are within the 7 days a store allows), and once
    # seen, the run's later messages are judged at that first sight, whatever the clock does.
    run = _run(key, timedelta(hours=1), "c" * 32)
    assert authorize(node, run, 3, behind).nonce == "c" * 32
    assert authorize(node, run, 3, OPERATOR_NOW + timedelta(hours=5)).nonce == "c" * 32
    # A slow clock does not stretch the 7-day limit: 7 days and 1 h ahead of the store is refused.
    with pytest.raises(RunNotAuthorized, match="longer than the 7 days"):
        authorize(node, _run(key, timedelta(days=7) - timedelta(hours=2), "d" * 32), 4, behind)
