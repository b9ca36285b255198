"""The temporal split and the training examples (DESIGN §6, §4.1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.data.dataset import ExampleConfig, sample_train_examples
from common.data.ingest import prepare_store

CATALOG = pd.DataFrame({
    "item_id": ["A", "B", "C", "D", "E", "F"],
    "name": [""] * 6, "category": ["x", "x", "y", "y", "z", "z"], "brand": [""] * 6, "price": ["1"] * 6,
})


def _tx(rows):
    return pd.DataFrame(rows, columns=["receipt_id", "ts", "member_id", "item_id", "quantity", "unit_price"])


MEMBERS = pd.DataFrame({
    "member_id": ["m1", "m2", "m3"],
    "join_date": ["2024-01-01"] * 3,
    "birth_year": ["1980", "1990", ""],
    "gender": ["f", "m", ""],
    "tier": ["gold", "basic", ""],
    "consent_training": ["true", "yes", "false"],
})


@pytest.fixture
def store(tmp_path):
    # Test period = last 28 days of the data: the last day is 2025-03-31, cut 2025-03-04.
    rows = [
        ("r1", "2025-01-05T10:00:00", "m1", "A", "1", "1"),
        ("r2", "2025-01-20T10:00:00", "m1", "B", "2", "1"),
        ("r3", "2025-02-10T10:00:00", "m1", "C", "1", "1"),
        ("r4", "2025-03-10T10:00:00", "m1", "D", "1", "1"),  # test basket of m1
        ("r4", "2025-03-10T10:00:00", "m1", "A", "1", "1"),
        ("r5", "2025-02-01T09:00:00", "m2", "E", "1", "1"),
        ("r6", "2025-03-31T09:00:00", "m2", "F", "1", "1"),  # test basket of m2
        ("r7", "2025-02-02T09:00:00", "m3", "E", "1", "1"),  # no consent
        ("r8", "2025-02-03T09:00:00", "", "F", "1", "1"),  # anonymous
        ("r9", "2025-02-04T09:00:00", "m2", "Z", "1", "1"),  # unknown item
        ("r10", "2025-02-11T10:00:00", "m1", "C", "-1", "1"),  # returns r3's C
    ]
    store_dir = tmp_path / "stores" / "T1"
    store_dir.mkdir(parents=True)
    CATALOG.to_csv(tmp_path / "catalog.csv", index=False)
    _tx(rows).to_csv(store_dir / "transactions.csv", index=False)
    MEMBERS.to_csv(store_dir / "members.csv", index=False)
    data, _ = prepare_store(store_dir, tmp_path, ExampleConfig(history_len=4, target_len=3))
    return data


def test_every_row_is_accounted_for(store):
    acc = store.accounting["transactions"]
    assert acc["rows_in"] == 11
    assert acc["quarantined"] == {"unknown_item": 1}
    assert acc["excluded"] == {"anonymous": 1, "no_consent": 1, "return_netted": 2}
    assert acc["accepted"] == 6
    assert acc["rows_in"] == acc["accepted"] + sum(acc["excluded"].values()) + sum(acc["quarantined"].values())


def test_split_by_time(store):
    cut = pd.Timestamp("2025-03-04", tz="UTC")
    assert store.cut_day == (cut - pd.Timestamp(0, tz="UTC")).days
    assert list(store.eval_member_ids) == ["m1", "m2"]
    # m1's test target is their first basket after the cut; C was returned, so m1's
    # pre-cut history is A, B.
    targets = {m: sorted(CATALOG["item_id"][t]) for m, t in zip(store.eval_member_ids, store.eval_targets)}
    assert targets == {"m1": ["A", "D"], "m2": ["F"]}
    hist = {m: sorted(CATALOG["item_id"][h]) for m, h in zip(store.eval_member_ids, store.eval_history_items)}
    assert hist == {"m1": ["A", "B"], "m2": ["E"]}
    # Assortment and popularity: training period only (anonymous included); D, F only after the cut.
    assert store.assortment.tolist() == [True, True, False, False, True, True]


def test_training_examples_never_see_the_test_period_and_history_precedes_target(store):
    d_index, f_index = 3, 5
    rng = np.random.default_rng(0)
    seen_targets = set()
    for _ in range(50):
        ex = sample_train_examples(store, rng, ExampleConfig(history_len=4, target_len=3))
        assert len(ex) == store.n_train_members == 2  # one example per member
        for n, member in enumerate(store.member_ids):
            hist = set(ex.hist_items[n][ex.hist_mask[n] > 0].tolist())
            target = set(ex.target_items[n][ex.target_mask[n] > 0].tolist())
            assert d_index not in hist | target
            # F was bought by m2 only in the test period; anonymous F is not member history.
            assert f_index not in hist | target
            seen_targets.add((member, tuple(sorted(target))))
            if member == "m1":
                # m1 has receipts A (Jan 5) then B (Jan 20): the target is B and history A.
                assert target == {1} and hist == {0}
            else:
                # m2 has one pre-cut receipt: the cold-start example, empty history.
                assert target == {4} and hist == set()
    assert seen_targets == {("m1", (1,)), ("m2", (4,))}


def test_profile_features_are_one_hot_per_group(store):
    # Four groups (age band, gender, tier, tenure): four ones per member.
    assert (store.profile.sum(axis=1) == 4).all()
