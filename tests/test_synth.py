"""The generated chain: deterministic by seed, and it follows the §3 contract."""

from __future__ import annotations

import json

import pandas as pd

from common.data import contract
from common.data.storefiles import write_chain
from common.data.synth import ChainSpec, generate_chain


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path, small_spec):
    write_chain(generate_chain(small_spec), tmp_path / "a")
    write_chain(generate_chain(small_spec), tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 1 + 3 * 3
    assert a == b


def test_different_seed_gives_different_data(small_spec):
    one = generate_chain(small_spec)
    other = generate_chain(ChainSpec(**{**small_spec.__dict__, "seed": small_spec.seed + 1}))
    assert not one.stores[0].transactions.equals(other.stores[0].transactions)


def test_files_follow_the_contract(small_chain_dir):
    catalog = pd.read_csv(small_chain_dir / contract.CATALOG_FILE, dtype=str, keep_default_na=False)
    assert tuple(catalog.columns) == contract.CATALOG_COLUMNS
    assert catalog["item_id"].is_unique and (catalog["item_id"] != "").all()
    assert (catalog["category"] != "").all()
    assert (catalog["price"].astype(float) >= 0).all()
    for store in sorted((small_chain_dir / "stores").iterdir()):
        meta = json.loads((store / contract.STORE_JSON).read_text())
        assert {"store_id", "name", "region", "opened"} <= meta.keys()
        tx = pd.read_csv(store / contract.TRANSACTIONS_FILE, dtype=str, keep_default_na=False)
        members = pd.read_csv(store / contract.MEMBERS_FILE, dtype=str, keep_default_na=False)
        assert tuple(tx.columns) == contract.TRANSACTION_COLUMNS
        assert tuple(members.columns) == contract.MEMBER_COLUMNS
        assert (tx["receipt_id"] != "").all()
        ts = pd.to_datetime(tx["ts"], format="ISO8601")
        assert ts.max() <= pd.Timestamp.now()
        assert (tx.groupby("receipt_id")["ts"].nunique() == 1).all(), "one ts per receipt"
        assert tx["item_id"].isin(catalog["item_id"]).all()
        qty = tx["quantity"].astype(int)
        assert (qty != 0).all() and (qty < 0).any(), "returns exist and no zero quantities"
        assert (tx["unit_price"].astype(float) >= 0).all()
        known = tx["member_id"][tx["member_id"] != ""]
        assert known.isin(members["member_id"]).all()
        assert (tx["member_id"] == "").any(), "anonymous receipts exist"
        assert members["member_id"].is_unique
        pd.to_datetime(members["join_date"], format="ISO8601")
        assert set(members["consent_training"]) <= {"true", "false"}


def test_some_members_shop_at_several_stores(small_spec):
    chain = generate_chain(small_spec)
    counts = pd.concat([s.members["member_id"] for s in chain.stores]).value_counts()
    share = (counts > 1).sum() / len(counts)
    assert 0.03 < share < 0.2
