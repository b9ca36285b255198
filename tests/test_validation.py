"""`storefed validate`: every messy-export case of issue 9, with exact counts and reasons."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from common.data.ingest import validate_store
from simulations.cli import main

NOW = pd.Timestamp("2025-06-01T00:00:00Z")
CATALOG = "item_id,name,category,brand,price\nA,a,x,,1\nB,b,x,,1\nC,c,y,,1\nD,d,y,,1\n"
MEMBERS = ("member_id,join_date,birth_year,gender,tier,consent_training\n"
           "m1,2024-01-01,1980,f,gold,true\nm2,2024-01-01,1990,m,basic,yes\nm3,2024-02-01,,,,false\n")
HEADER = "receipt_id,ts,member_id,item_id,quantity,unit_price,promo,channel\n"
GOOD = ("r1,2025-01-05T10:00:00,m1,A,1,2.50,,pos\n"
        "r1,2025-01-05T10:00:00,m1,B,2,1.00,,pos\n"
        "r2,2025-01-06T11:00:00,m2,C,1,3.00,,pos\n"
        "r3,2025-01-07T12:00:00,,D,1,1.00,,pos\n"
        "r4,2025-01-08T12:00:00,m3,A,1,2.50,,pos\n")


def store(tmp_path, tx=HEADER + GOOD, members=MEMBERS, tx_bytes=None, tx_name="transactions.csv", **kw):
    root = tmp_path / "chain"
    sdir = root / "stores" / "S1"
    sdir.mkdir(parents=True)
    (root / "catalog.csv").write_text(CATALOG)
    (sdir / tx_name).write_bytes(tx_bytes if tx_bytes is not None else tx.encode("utf-8"))
    if members is not None:
        (sdir / "members.csv").write_text(members)
    result = validate_store(sdir, root, now=NOW, quarantine_dir=sdir / "state" / "quarantine", **kw)
    for report in result.files.values():
        assert report.balanced(), report.as_dict()
    return result, sdir


def tx_counts(result):
    return result.files["transactions"].as_dict()


def test_a_clean_store(tmp_path):
    result, _ = store(tmp_path)
    assert result.usable and result.fatal == [] and result.problems == []
    assert tx_counts(result) == {"rows_in": 5, "accepted": 3, "excluded": {"anonymous": 1, "no_consent": 1},
                                 "quarantined": {}}
    assert result.files["members"].as_dict() == {"rows_in": 3, "accepted": 2, "excluded": {"no_consent": 1},
                                                 "quarantined": {}}


def test_a_generated_store_has_nothing_quarantined(small_chain_dir):
    result = validate_store(small_chain_dir / "stores" / "S002", small_chain_dir, keep_data=False)
    assert result.usable and result.warnings == []
    for report in result.files.values():
        assert report.quarantined == {} and report.balanced()


def test_missing_required_column_makes_the_store_unusable(tmp_path):
    result, _ = store(tmp_path, tx=HEADER.replace(",quantity", "") + "r1,2025-01-05T10:00:00,m1,A,2.5,,pos\n")
    assert not result.usable
    assert "transactions.csv: required column 'quantity' is missing" in result.fatal[0]


def test_unknown_extra_column_is_kept_and_warned(tmp_path):
    tx = HEADER.strip() + ",cashier\n" + "".join(line + ",anna\n" for line in GOOD.splitlines())
    result, _ = store(tmp_path, tx=tx)
    assert result.usable and tx_counts(result)["accepted"] == 3
    assert any("unknown column 'cashier'" in w for w in result.warnings)


def test_utf8_bom(tmp_path):
    result, _ = store(tmp_path, tx_bytes=b"\xef\xbb\xbf" + (HEADER + GOOD).encode())
    assert result.usable and tx_counts(result)["accepted"] == 3


def test_semicolon_delimiter(tmp_path):
    result, _ = store(tmp_path, tx=(HEADER + GOOD).replace(",", ";"))
    assert result.usable and tx_counts(result)["accepted"] == 3
    assert any("';'" in w for w in result.warnings)


def test_latin1_encoding(tmp_path):
    text = HEADER + GOOD.replace("r2,2025-01-06T11:00:00,m2,C,1,3.00,,pos", "r2,2025-01-06T11:00:00,m2,C,1,3.00,Été,pos")
    result, _ = store(tmp_path, tx_bytes=text.encode("latin-1"))
    assert result.usable and tx_counts(result)["accepted"] == 3
    assert any("Latin-1" in w for w in result.warnings)


def test_empty_file(tmp_path):
    result, _ = store(tmp_path, tx_bytes=b"")
    assert not result.usable and "is empty" in result.fatal[0]


def test_header_only(tmp_path):
    result, _ = store(tmp_path, tx=HEADER)
    assert not result.usable and "no transaction rows (header only)" in result.fatal[0]
    assert tx_counts(result)["rows_in"] == 0


def _one_bad(tmp_path, line, reason, column, value):
    result, sdir = store(tmp_path, tx=HEADER + GOOD + line + "\n")
    assert result.usable
    assert tx_counts(result)["quarantined"] == {reason: 1}
    assert tx_counts(result)["accepted"] == 3
    assert result.problems == [{"file": str(sdir / "transactions.csv"), "row": 6, "column": column,
                                "value": value, "reason": reason}]
    quarantined = pd.read_csv(sdir / "state" / "quarantine" / "transactions.csv", dtype=str, keep_default_na=False)
    assert quarantined[["row", "reason", "column"]].values.tolist() == [["6", reason, column]]
    return result


def test_unparsable_timestamp(tmp_path):
    _one_bad(tmp_path, "r9,yesterday,m1,A,1,1.00,,pos", "bad_timestamp", "ts", "yesterday")


def test_timestamp_in_the_future(tmp_path):
    _one_bad(tmp_path, "r9,2025-07-01T10:00:00,m1,A,1,1.00,,pos", "future_timestamp", "ts", "2025-07-01T10:00:00")


def test_unknown_item(tmp_path):
    _one_bad(tmp_path, "r9,2025-01-09T10:00:00,m1,ZZZ,1,1.00,,pos", "unknown_item", "item_id", "ZZZ")


def test_quantity_zero(tmp_path):
    _one_bad(tmp_path, "r9,2025-01-09T10:00:00,m1,A,0,1.00,,pos", "zero_quantity", "quantity", "0")


def test_negative_unit_price(tmp_path):
    _one_bad(tmp_path, "r9,2025-01-09T10:00:00,m1,A,1,-1.00,,pos", "negative_unit_price", "unit_price", "-1.00")


def test_timestamps_in_different_formats_and_time_zones(tmp_path):
    lines = ("t1,2025-02-01T10:00:00Z,m1,A,1,1,,pos\n"
             "t2,2025-02-01 11:00:00+01:00,m1,B,1,1,,pos\n"
             "t3,01.02.2025 10:00,m2,A,1,1,,pos\n"
             "t4,02/01/2025 10:00,m2,B,1,1,,pos\n"
             "t5,2025-02-01T10:00,m2,C,1,1,,pos\n")
    result, _ = store(tmp_path, tx=HEADER + lines)
    assert tx_counts(result) == {"rows_in": 5, "accepted": 5, "excluded": {}, "quarantined": {}}
    days = result.lines.sort_values("row")["day"].tolist()
    instant = (pd.Timestamp("2025-02-01T10:00:00Z") - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(days=1)
    assert days == pytest.approx([instant] * 5)


def test_naive_timestamps_are_in_the_stores_time_zone(tmp_path):
    root = tmp_path / "chain"
    result, sdir = store(tmp_path, tx=HEADER + "t1,2025-02-01T10:00:00,m1,A,1,1,,pos\n")
    (sdir / "store.json").write_text(json.dumps({"store_id": "S1", "timezone": "Europe/Berlin"}))
    berlin = validate_store(sdir, root, now=NOW)
    assert berlin.lines["day"].iloc[0] == pytest.approx(result.lines["day"].iloc[0] - 1 / 24)


def test_a_receipt_with_two_timestamps(tmp_path):
    result, _ = store(tmp_path, tx=HEADER + GOOD + "r2,2025-01-06T12:30:00,m2,D,1,1.00,,pos\n")
    # Both lines of r2 are set aside: which timestamp is right cannot be known.
    assert tx_counts(result) == {"rows_in": 6, "accepted": 2, "excluded": {"anonymous": 1, "no_consent": 1},
                                 "quarantined": {"receipt_ts_conflict": 2}}
    assert {p["row"] for p in result.problems} == {3, 6}


def test_duplicate_member_id(tmp_path):
    members = MEMBERS + "m2,2024-03-01,1970,f,silver,true\n"
    result, sdir = store(tmp_path, members=members)
    assert result.files["members"].as_dict() == {"rows_in": 4, "accepted": 1, "excluded": {"no_consent": 1},
                                                 "quarantined": {"duplicate_member_id": 2}}
    # m2's purchases cannot be tied to one member record: quarantined, not trained on.
    assert tx_counts(result)["quarantined"] == {"unknown_member": 1}
    assert (sdir / "state" / "quarantine" / "members.csv").exists()


def test_consent_words(tmp_path):
    members = ("member_id,join_date,consent_training\n"
               "m1,2024-01-01,Yes\nm2,2024-01-01,0\nm3,2024-01-01,1\nm4,2024-01-01,NO\nm5,2024-01-01,maybe\n")
    result, _ = store(tmp_path, members=members)
    assert result.files["members"].as_dict() == {"rows_in": 5, "accepted": 2, "excluded": {"no_consent": 2},
                                                 "quarantined": {"bad_consent": 1}}
    assert dict(result.consent) == {"m1": True, "m2": False, "m3": True, "m4": False}


def test_consent_column_absent_refuses_unless_assumed(tmp_path):
    members = "member_id,join_date\nm1,2024-01-01\nm2,2024-01-01\nm3,2024-01-01\n"
    result, _ = store(tmp_path, members=members)
    assert not result.usable and "no 'consent_training' column" in result.fatal[0]
    assumed, _ = store(tmp_path / "again", members=members, assume_consent=True)
    assert assumed.usable and tx_counts(assumed)["accepted"] == 4


def test_transactions_of_members_absent_from_members(tmp_path):
    result, _ = store(tmp_path, tx=HEADER + GOOD + "r9,2025-01-09T10:00:00,m77,A,1,1.00,,pos\n")
    assert tx_counts(result)["quarantined"] == {"unknown_member": 1}
    assert result.problems[0]["value"] == "m77" and result.problems[0]["row"] == 6


def test_returns_are_netted_against_purchases(tmp_path):
    lines = ("p1,2025-01-01T10:00:00,m1,A,2,1,,pos\n"   # bought 2 A
             "p2,2025-01-03T10:00:00,m1,A,-1,1,,pos\n"  # returned 1 A: p1 keeps 1
             "p3,2025-01-04T10:00:00,m1,B,1,1,,pos\n"   # bought B
             "p4,2025-01-05T10:00:00,m1,B,-1,1,,pos\n"  # returned it: both lines gone
             "p5,2025-01-06T10:00:00,m2,C,-1,1,,pos\n"  # a return of a purchase before the data
             "p6,2025-01-07T10:00:00,m2,C,1,1,,pos\n")
    result, _ = store(tmp_path, tx=HEADER + lines)
    assert tx_counts(result) == {"rows_in": 6, "accepted": 2, "quarantined": {},
                                 "excluded": {"return_netted": 3, "return_unmatched": 1}}
    kept = result.lines.sort_values("row")
    assert kept["row"].tolist() == [1, 6] and kept["qty"].tolist() == [1.0, 1.0]


def test_parquet_with_the_right_types(tmp_path):
    import io

    frame = pd.read_csv(io.StringIO(HEADER + GOOD), dtype=str, keep_default_na=False)
    frame["quantity"] = frame["quantity"].astype(int)
    frame["unit_price"] = frame["unit_price"].astype(float)
    frame["ts"] = pd.to_datetime(frame["ts"])
    buf = io.BytesIO()
    frame.to_parquet(buf)
    result, _ = store(tmp_path, tx_bytes=buf.getvalue(), tx_name="transactions.parquet")
    assert result.usable and tx_counts(result)["accepted"] == 3


def test_parquet_with_wrong_column_types(tmp_path):
    import io

    frame = pd.read_csv(io.StringIO(HEADER + GOOD), dtype=str, keep_default_na=False)
    frame["ts"] = [[1, 2]] * len(frame)  # a list column where a timestamp belongs
    buf = io.BytesIO()
    frame.to_parquet(buf)
    result, _ = store(tmp_path, tx_bytes=buf.getvalue(), tx_name="transactions.parquet")
    assert not result.usable and "column 'ts' has type list" in result.fatal[0]


def test_a_csv_that_is_not_a_csv(tmp_path):
    result, _ = store(tmp_path, tx_bytes=bytes(range(256)) * 4)
    assert not result.usable and "binary file, not a CSV" in result.fatal[0]


def test_cli_exit_codes_and_json(tmp_path, capsys):
    _, clean = store(tmp_path / "a")
    assert main(["validate", "--store-dir", str(clean), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] is True and report["files"]["transactions"]["accepted"] == 3
    assert set(report) >= {"store_id", "usable", "files", "problems"}
    _, messy = store(tmp_path / "b", tx=HEADER + GOOD + "r9,2025-01-09T10:00:00,m1,ZZZ,1,1.00,,pos\n")
    assert main(["validate", "--store-dir", str(messy), "--json"]) == 1
    capsys.readouterr()
    _, broken = store(tmp_path / "c", tx_bytes=b"")
    assert main(["validate", "--store-dir", str(broken)]) == 2
    assert "NOT USABLE" in capsys.readouterr().out


def test_member_problems_name_the_source_column_and_date_only_joins_parse(tmp_path):
    members = ("member_id,join_date,birth_year,consent_training\n"
               "m1,01.02.2024,1980,true\nm2,12/31/2023,1990,true\nm3,someday,1985,true\nm4,2024-01-01,1700,true\n")
    result, sdir = store(tmp_path, members=members)
    assert result.files["members"].as_dict() == {"rows_in": 4, "accepted": 2, "excluded": {},
                                                 "quarantined": {"bad_join_date": 1, "bad_birth_year": 1}}
    members_file = str(sdir / "members.csv")
    assert [p for p in result.problems if p["file"] == members_file] == [
        {"file": members_file, "row": 3, "column": "join_date", "value": "someday", "reason": "bad_join_date"},
        {"file": members_file, "row": 4, "column": "birth_year", "value": "1700", "reason": "bad_birth_year"},
    ]
