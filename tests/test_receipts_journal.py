"""The receipts journal (issue 22, item 3): SQLite, one transaction per receipt; nothing in it
can stop a load (bad rows are quarantined with their reason); receipts cannot poison a store
(an id is used once, text is printable and bounded, a return only of what the member bought)."""

from __future__ import annotations

import shutil
import sqlite3

import pandas as pd
import pytest

from client.state import receipts_journal as rj
from client import store as store_module
from client.serving.service import ReceiptRejected, StoreServing
from common.config import RunConfig
from common.data import contract
from common.data.ingest import validate_store

HEADER = ",".join(rj.COLUMNS)


@pytest.fixture
def chain(tmp_path, small_chain_dir):
    out = tmp_path / "chain"
    shutil.copytree(small_chain_dir, out, ignore=shutil.ignore_patterns("state"))
    return out


def _tx(store):
    return pd.read_csv(store / "transactions.csv", dtype=str, keep_default_na=False)


def _member_with_history(store):
    tx = _tx(store)
    members = pd.read_csv(store / "members.csv", dtype=str, keep_default_na=False)
    trains = members["consent_training"].str.lower().isin(["true", "1", "yes"])
    if "home_store" in members:
        trains &= members["home_store"].map(lambda h: contract.trains_here(h, "S001"))
    consenting = set(members.loc[trains, "member_id"])
    mine = tx[tx["member_id"].isin(consenting)]
    member = mine.groupby("member_id").size().sort_values(ascending=False).index[0]
    return member, mine[mine["member_id"] == member]


def _load(store, state):
    store_module._CACHE.clear()
    return store_module.load_store({"store-dir": str(store), "state-dir": str(state)}, RunConfig.from_mapping({}))


def _quarantined(state) -> dict:
    q = pd.read_csv(state / "quarantine" / "transactions.csv", dtype=str, keep_default_na=False)
    return q["reason"].value_counts().to_dict()


def _receipt(rid, member, lines, ts="2025-12-31T18:00:00"):
    return {"receipt_id": rid, "ts": ts, "member_id": member,
            "lines": [{"item_id": i, "quantity": q, "unit_price": 1.5} for i, q in lines]}


def test_a_receipt_is_one_durable_transaction_in_wal_mode(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(rj, "_fsync_dir", lambda p: synced.append(p))
    journal = rj.Journal(tmp_path / "state")
    assert synced == [tmp_path / "state"]  # the new file's directory entry made durable
    mode = journal._con.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal" and journal._con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    receipt = _receipt("R-1", "M1", [("A", 2), ("B", 1), ("C", -1)])
    assert journal.record(receipt) is True
    assert synced == [tmp_path / "state"] * 2  # ... and the -wal file's, at the first commit
    assert journal.record(receipt) is False  # receipt_id is the primary key
    assert journal.find("R-1")["lines"] == [{"item_id": "A", "quantity": "2", "unit_price": "1.5"},
                                            {"item_id": "B", "quantity": "1", "unit_price": "1.5"},
                                            {"item_id": "C", "quantity": "-1", "unit_price": "1.5"}]
    # A power cut inside the commit of R-2: the disk holds the database and a WAL whose last
    # frame is cut. SQLite drops the incomplete transaction; the retry records it complete.
    journal.record(_receipt("R-2", "M1", [("A", 1), ("B", 1), ("C", 1)]))
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in (rj.JOURNAL_FILE, rj.JOURNAL_FILE + "-wal"):
        shutil.copy(tmp_path / "state" / name, cut / name)
    wal = cut / (rj.JOURNAL_FILE + "-wal")
    wal.write_bytes(wal.read_bytes()[:-100])
    journal.close()
    rows = rj.read_journal(cut)
    assert rows.sqlite["receipt_id"].tolist() == ["R-1"] * 3 and not rows.warnings
    again = rj.Journal(cut)
    assert again.find("R-2") is None and again.record(_receipt("R-2", "M1", [("A", 1), ("B", 1), ("C", 1)]))
    assert rj.read_journal(cut).sqlite["receipt_id"].tolist() == ["R-1"] * 3 + ["R-2"] * 3


def test_nothing_in_the_journal_stops_a_load_bad_rows_are_quarantined(chain):
    store = chain / "stores" / "S001"
    state = store / "state"
    clean = _load(store, state).data.accounting["transactions"]
    tx = _tx(store)
    member, _ = _member_with_history(store)
    item = tx["item_id"].iloc[0]
    # The old CSV journal, damaged every way: a NUL in an id (what made every load fail), a
    # torn line, binary garbage, a line that is not UTF-8; and two good receipts.
    state.mkdir(exist_ok=True)
    good = [f"J-1,2025-12-30T10:00:00,{member},{item},1,2.0,,api", f"J-2,2025-12-30T11:00:00,{member},{item},2,2.0,,api"]
    (state / rj.LEGACY_FILE).write_bytes("\n".join([HEADER, good[0], f"X\x00Y,2025-12-30T10:00:00,{member},{item},1,2.0,,api",
                                                    "J-9,2025-12-3", good[1]]).encode()
                                         + b"\n\x00\x01garbage\x02,\x03\n" + b"J-8,\xe9t\xe9,a,b,c,d,e,f\n")
    # The SQLite journal, edited by hand: a NUL, an over-long id, an integer cell.
    journal = rj.Journal(state)
    journal.record(_receipt("J-3", member, [(item, 1)]))
    con = sqlite3.connect(state / rj.JOURNAL_FILE)
    con.execute("INSERT INTO lines (receipt_id, ts, member_id, item_id, quantity, unit_price, promo, channel) "
                "VALUES (?, '2025-12-30T10:00:00', ?, ?, '1', '2.0', '', 'api')", ("A\x00B", member, item))
    con.execute("INSERT INTO lines (receipt_id, ts, member_id, item_id, quantity, unit_price, promo, channel) "
                "VALUES (?, '2025-12-30T10:00:00', ?, ?, 1, 2.0, '', 'api')", ("L" * 65, member, item))
    con.commit()
    con.close()

    node = _load(store, state)  # does not raise
    report = node.data.accounting["transactions"]
    assert report["rows_in"] == clean["rows_in"] + 6 + 3
    assert _quarantined(state) == {"control_character": 2, "too_few_fields": 2, "bad_encoding": 1,
                                   "field_too_long": 1}
    assert report["accepted"] == clean["accepted"] + 3  # J-1, J-2, J-3
    q = pd.read_csv(state / "quarantine" / "transactions.csv", dtype=str, keep_default_na=False)
    assert set(q.loc[q["reason"] == "control_character", "receipt_id"]) == {"X\\x00Y", "A\\x00B"}  # shown escaped
    # storefed validate reads it the same way (and says which file a problem is in).
    checked = validate_store(store, chain, keep_data=False, journal=rj.journal_sources(state))
    assert checked.usable and checked.files["transactions"].quarantined == {
        "control_character": 2, "too_few_fields": 2, "bad_encoding": 1, "field_too_long": 1}
    assert {p["file"] for p in checked.problems} == {str(state / rj.LEGACY_FILE), str(state / rj.JOURNAL_FILE)}
    # ... and so does serving, which starts and keeps taking receipts.
    serving = StoreServing(store)
    assert serving.take_receipt(_receipt("J-4", member, [(item, 1)]))[1] is True
    serving.journal.close()
    journal.close()

    # A database that is garbage: a warning, the load goes on without its rows.
    (state / rj.JOURNAL_FILE).write_bytes(b"this is not a database" * 100)
    for extra in ("-wal", "-shm"):
        (state / (rj.JOURNAL_FILE + extra)).unlink(missing_ok=True)
    node = _load(store, state)
    assert node.data.accounting["transactions"]["rows_in"] == clean["rows_in"] + 6
    checked = validate_store(store, chain, keep_data=False, journal=rj.journal_sources(state))
    assert any(str(state / rj.JOURNAL_FILE) in w and "cannot be read" in w for w in checked.warnings)
    serving = StoreServing(store)  # serves; refuses receipts (503) rather than overwrite the file
    with pytest.raises(ReceiptRejected) as err:
        serving.take_receipt(_receipt("J-5", member, [(item, 1)]))
    assert err.value.status == 503 and err.value.reasons[0]["reason"] == "journal_unavailable"


def test_a_receipt_cut_in_the_old_csv_journal_counts_as_not_recorded(chain):
    store = chain / "stores" / "S001"
    state = store / "state"
    state.mkdir(exist_ok=True)
    member, _ = _member_with_history(store)
    items = _tx(store)["item_id"].value_counts().index[:3].tolist()
    lines = [f"TORN-1,2025-12-31T09:00:00,{member},{i},2,1.25,,api" for i in items]
    text = "\n".join([HEADER] + lines) + "\n"
    (state / rj.LEGACY_FILE).write_text(text[:-12])  # power cut inside the receipt's last line
    serving = StoreServing(store)
    receipt = {"receipt_id": "TORN-1", "ts": "2025-12-31T09:00:00", "member_id": member,
               "lines": [{"item_id": i, "quantity": 2, "unit_price": 1.25} for i in items]}
    assert serving.take_receipt(receipt)[1] is True  # the retry is recorded, complete
    assert len(serving.journal.find("TORN-1")["lines"]) == 3
    assert serving.take_receipt(receipt)[1] is False  # and once
    node = _load(store, state)
    assert _quarantined(state) == {"incomplete_receipt": 2, "too_few_fields": 1}
    assert node.data.accounting["transactions"]["quarantined"] == {"incomplete_receipt": 2, "too_few_fields": 1}


def test_a_journal_row_never_takes_a_receipt_id_of_the_transactions_file(chain):
    store = chain / "stores" / "S001"
    state = store / "state"
    state.mkdir(exist_ok=True)
    tx = _tx(store)
    rid = tx["receipt_id"].value_counts().index[0]
    row = tx[tx["receipt_id"] == rid].iloc[0]
    (state / rj.LEGACY_FILE).write_text("\n".join([HEADER, f"{rid},2025-12-30T10:00:00,{row['member_id']},"
                                                           f"{row['item_id']},1,2.0,,api"]) + "\n")
    node = _load(store, state)
    # Only the journal's row is set aside; the store's own rows of that receipt all train.
    assert _quarantined(state) == {"receipt_id_in_transactions": 1}
    assert "receipt_ts_conflict" not in node.data.accounting["transactions"]["quarantined"]


def test_the_prepared_data_follows_the_journal_though_its_file_time_does_not(chain, monkeypatch):
    store = chain / "stores" / "S001"
    state = store / "state"
    member, _ = _member_with_history(store)
    item = _tx(store)["item_id"].iloc[0]
    journal = rj.Journal(state)
    journal.record(_receipt("C-1", member, [(item, 1)]))
    store_module._CACHE.clear()
    cfg = RunConfig.from_mapping({})
    first = store_module.load_store({"store-dir": str(store), "state-dir": str(state)}, cfg)
    before = (state / rj.JOURNAL_FILE).stat().st_mtime_ns
    journal.record(_receipt("C-2", member, [(item, 1), (item, 2)]))  # in the WAL; the main file is not touched
    assert (state / rj.JOURNAL_FILE).stat().st_mtime_ns == before
    second = store_module.load_store({"store-dir": str(store), "state-dir": str(state)}, cfg)
    assert second.data.accounting["transactions"]["rows_in"] == first.data.accounting["transactions"]["rows_in"] + 2
    third = store_module.load_store({"store-dir": str(store), "state-dir": str(state)}, cfg)
    assert third.data is second.data  # nothing new: the cache answers


def test_intake_refuses_what_would_poison_the_store(chain):
    store = chain / "stores" / "S001"
    member, history = _member_with_history(store)
    tx = _tx(store)
    serving = StoreServing(store)

    def refused(body, status=422):
        with pytest.raises(ReceiptRejected) as err:
            serving.take_receipt(body)
        assert err.value.status == status
        return [r["reason"] for r in err.value.reasons]

    item = history["item_id"].iloc[0]
    # Text: printable and bounded, in every field.
    assert refused(_receipt("X\u0000Y", member, [(item, 1)])) == ["control_character"]
    assert refused(_receipt("R\nS", member, [(item, 1)])) == ["control_character"]
    assert refused(_receipt("R" * 65, member, [(item, 1)])) == ["field_too_long"]
    assert refused(_receipt("OK-1", member + "\u0007", [(item, 1)])) == ["control_character"]
    body = _receipt("OK-1", member, [(item, 1)])
    body["lines"][0]["promo"] = "P\x00"
    assert refused(body) == ["control_character"]
    # A receipt id of transactions.csv: refused with another time or other lines; the same
    # receipt again is a retry, answered as recorded before, and nothing is written.
    rid = tx.loc[tx["member_id"] == member, "receipt_id"].iloc[0]
    own = tx[tx["receipt_id"] == rid]
    same = {"receipt_id": rid, "ts": own["ts"].iloc[0], "member_id": member,
            "lines": [{"item_id": i, "quantity": float(q), "unit_price": float(p)}
                      for i, q, p in zip(own["item_id"], own["quantity"], own["unit_price"])][::-1]}
    assert serving.take_receipt(same) == (serving.check_receipt(same), False)
    assert refused(dict(same, ts="2025-12-30T10:00:00"), 409) == ["duplicate_receipt_id"]
    assert refused(dict(same, lines=same["lines"][:1] + [dict(same["lines"][0], quantity=99)]), 409) == \
        ["duplicate_receipt_id"]
    assert serving.journal.find(rid) is None
    # A journal receipt id: the same again → before; otherwise 409.
    assert serving.take_receipt(_receipt("API-1", member, [(item, 1)]))[1] is True
    assert serving.take_receipt(_receipt("API-1", member, [(item, 1)]))[1] is False
    assert refused(_receipt("API-1", member, [(item, 2)]), 409) == ["duplicate_receipt_id"]
    # Returns: only what the member bought here, net per item, counting receipts taken since.
    mine = serving.lines[serving.lines["member"] == member].groupby("item")["qty"].sum()
    bought = pd.Series(mine.to_numpy(), index=[str(serving.items.item_ids[i]) for i in mine.index])
    everything = [(i, -1000) for i in bought.index]
    assert refused(_receipt("RET-1", member, everything)) == ["return_exceeds_purchases"] * len(bought)
    never = next(i for i in tx["item_id"] if i not in bought.index)
    assert refused(_receipt("RET-2", member, [(never, -1)])) == ["return_exceeds_purchases"]
    top = bought.idxmax()
    net = float(bought[top]) + (1 if top == item else 0)  # API-1 bought one more of `item`
    assert serving.take_receipt(_receipt("RET-3", member, [(top, -net)]))[1] is True  # all of it back: fine
    assert refused(_receipt("RET-4", member, [(top, -1)])) == ["return_exceeds_purchases"]
    assert serving.take_receipt(_receipt("RET-5", member, [(top, 2), (top, -2)]))[1] is True  # bought and returned
    # Training after all this: the member still trains, with every other item of their history.
    node = _load(store, store / "state")
    assert member in set(map(str, node.data.member_ids))
    assert rj.read_journal(store / "state").sqlite["receipt_id"].drop_duplicates().tolist() == ["API-1", "RET-3", "RET-5"]
