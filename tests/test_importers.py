"""`storefed import`: small hand-made files of each public format → the data contract."""

from __future__ import annotations

import json

import pandas as pd

from common.data.ingest import validate_store
from common.data.storefiles import store_dirs
from simulations.cli import main


def _write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)


def test_instacart_offsets_become_dates_and_every_row_is_accepted(tmp_path, capsys):
    src = tmp_path / "ic"
    # User 1: orders 1, 2 (7 days later), 3 (3 days after that); user 2: a single order.
    _write(src, "orders.csv", "order_id,user_id,eval_set,order_number,order_dow,order_hour_of_day,"
                              "days_since_prior_order\n10,1,prior,1,0,8,\n11,1,prior,2,0,9,7.0\n"
                              "12,1,train,3,0,10,3.0\n20,2,prior,1,0,14,\n")
    _write(src, "order_products__prior.csv", "order_id,product_id,add_to_cart_order,reordered\n"
                                             "10,100,1,0\n10,101,2,0\n11,100,1,1\n20,102,1,0\n")
    _write(src, "order_products__train.csv", "order_id,product_id,add_to_cart_order,reordered\n12,101,1,1\n")
    _write(src, "products.csv", "product_id,product_name,aisle_id,department_id\n100,Milk,1,7\n101,Bread,2,3\n"
                                "102,Soap,3,9\n")
    _write(src, "departments.csv", "department_id,department\n7,dairy\n3,bakery\n9,household\n")
    out = tmp_path / "chain"
    assert main(["import", "--format", "instacart", str(src), "--out", str(out), "--stores", "1",
                 "--end", "2025-06-30", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stores"] == 1 and summary["receipts"] == 4 and summary["lines"] == 5 and summary["skus"] == 3
    (store,) = store_dirs(out)
    tx = pd.read_csv(store / "transactions.csv", dtype=str)
    day = dict(zip(tx["receipt_id"], tx["ts"]))
    # The last order of each user lands on --end; earlier ones walk back through the offsets.
    assert day["12"] == "2025-06-30T10:00:00Z" and day["11"] == "2025-06-27T09:00:00Z"
    assert day["10"] == "2025-06-20T08:00:00Z" and day["20"] == "2025-06-30T14:00:00Z"
    catalog = pd.read_csv(out / "catalog.csv", dtype=str)
    assert dict(zip(catalog["item_id"], catalog["category"])) == {"100": "dairy", "101": "bakery", "102": "household"}
    report = validate_store(store, out, now=pd.Timestamp("2026-01-01", tz="UTC"), keep_data=False)
    assert report.usable
    assert json.loads((store / "store.json").read_text())["store_id"] == "S001"


def test_movielens_day_baskets_and_a_stable_store_split(tmp_path, capsys):
    src = tmp_path / "ml"
    # 86400 s = one day: user 1 rates on day 0 (twice) and day 1; user 2 on day 0.
    _write(src, "ratings.csv", "userId,movieId,rating,timestamp\n1,5,4.0,100\n1,6,3.0,200\n1,5,5.0,86500\n"
                               "2,7,2.0,300\n")
    _write(src, "movies.csv", "movieId,title,genres\n5,A (1999),Drama|Crime\n6,B (2001),Comedy\n"
                              "7,C (2005),(no genres listed)\n")
    out = tmp_path / "chain"
    assert main(["import", "--format", "movielens", str(src), "--out", str(out), "--stores", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["receipts"] == 3 and summary["lines"] == 4
    frames = {d.name: pd.read_csv(d / "transactions.csv", dtype=str) for d in store_dirs(out)}
    # crc32("1") % 3 = 2, crc32("2") % 3 = 1; the empty store S001 is not written.
    assert {k: set(v["member_id"]) for k, v in frames.items()} == {"S002": {"2"}, "S003": {"1"}}
    everything = pd.concat(frames.values())
    baskets = everything.groupby("receipt_id")["item_id"].apply(sorted).to_dict()
    assert baskets == {"1-19700101": ["5", "6"], "1-19700102": ["5"], "2-19700101": ["7"]}
    assert set(everything.groupby("receipt_id")["ts"].nunique()) == {1}  # one ts per receipt
    catalog = pd.read_csv(out / "catalog.csv", dtype=str)
    assert dict(zip(catalog["item_id"], catalog["category"])) == {"5": "Drama", "6": "Comedy", "7": "unknown"}
    for d in store_dirs(out):
        assert validate_store(d, out, now=pd.Timestamp("2026-01-01", tz="UTC"), keep_data=False).usable


def test_a_wrong_table_is_named_with_its_missing_column(tmp_path, capsys):
    src = tmp_path / "ml"
    _write(src, "ratings.csv", "user,movie,when\n1,5,100\n")
    _write(src, "movies.csv", "movieId,title,genres\n5,A,Drama\n")
    assert main(["import", "--format", "movielens", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ratings: missing column(s) userId, movieId, timestamp" in err and "Traceback" not in err
