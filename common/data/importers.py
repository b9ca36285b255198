"""Public next-basket / interaction formats → the data contract of DESIGN §3. Pure: frames in, frames out.

`storefed import --format FORMAT SRC --out DIR` reads the source tables, calls one of these
and writes the chain with :func:`common.data.storefiles.write_chain` (atomic).

* ``instacart`` (the Instacart Market Basket Analysis tables): ``orders`` (order_id, user_id,
  order_number, order_hour_of_day, days_since_prior_order), ``order_products`` (order_id,
  product_id; the prior and train files together), ``products`` (product_id, product_name,
  aisle_id, department_id) and optionally ``departments`` (department_id, department).
  The source has only day offsets between a user's orders: dates are made absolute by
  placing each user's last order on ``end`` and walking back through the offsets.
* ``movielens`` (the MovieLens ``ratings``/``movies`` CSV layout): ``ratings`` (userId,
  movieId, timestamp in Unix seconds), ``movies`` (movieId, title, genres). A member's
  ratings of one day are one basket; the category is the first genre.

Neither source has a store: a member goes to store ``S{1 + hash(member) mod stores}`` (a
stable hash, so a re-import splits the same way). Both are public research data published
for this use: the importer writes ``consent_training = true`` for every member and says so.
"""

from __future__ import annotations

import zlib
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd

from common.data.storefiles import DataError
from common.data.synth import GeneratedChain, GeneratedStore

FORMATS = ("instacart", "movielens")
# The tables each format reads (file stem → required columns).
TABLES = {
    "instacart": {"orders": ("order_id", "user_id", "order_number", "order_hour_of_day", "days_since_prior_order"),
                  "order_products": ("order_id", "product_id"),
                  "products": ("product_id", "product_name", "department_id")},
    "movielens": {"ratings": ("userId", "movieId", "timestamp"), "movies": ("movieId", "title", "genres")},
}


def require(frame: pd.DataFrame, columns: tuple[str, ...], source: str) -> None:
    """DataError naming the file and the missing columns."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; this file has "
                        f"{', '.join(map(str, frame.columns)) or 'no columns'} — is it the right table of the format?")


def store_of(member_ids: pd.Series, stores: int) -> np.ndarray:
    """Stable store index of each member: crc32 of the id, modulo the number of stores."""
    return np.array([zlib.crc32(str(m).encode()) % stores for m in member_ids], dtype=np.int64)


def _chain(lines: pd.DataFrame, catalog: pd.DataFrame, stores: int, region: str) -> GeneratedChain:
    """Contract frames from ``lines`` (receipt_id, ts, member_id, item_id) and a catalog."""
    lines = lines.assign(quantity=1, unit_price=0.0, promo="", channel="")
    lines["store"] = store_of(lines["member_id"], stores)
    first = lines.groupby("member_id")["ts"].min()
    out = []
    for s in range(stores):
        sid = f"S{s + 1:03d}"
        tx = lines[lines["store"] == s].drop(columns="store")
        if tx.empty:
            continue  # a store without members would have nothing to train on
        tx = tx.sort_values(["ts", "receipt_id", "item_id"], kind="stable").reset_index(drop=True)
        tx["ts"] = tx["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        members = pd.DataFrame({"member_id": sorted(tx["member_id"].unique())})
        members["join_date"] = first.reindex(members["member_id"]).dt.strftime("%Y-%m-%d").to_numpy()
        members = members.assign(birth_year="", gender="", tier="", consent_training="true")
        opened = (first.min() - timedelta(days=1)).strftime("%Y-%m-%d") if len(first) else "2000-01-01"
        meta = {"store_id": sid, "name": f"{region} store {s + 1}", "region": region, "opened": opened}
        out.append(GeneratedStore(sid, meta, tx, members))
    return GeneratedChain(spec=None, catalog=catalog, stores=out)


def from_instacart(orders: pd.DataFrame, order_products: pd.DataFrame, products: pd.DataFrame,
                   departments: pd.DataFrame | None, stores: int, end: date) -> GeneratedChain:
    """The Instacart tables as a chain of ``stores`` stores; each user's last order on ``end``."""
    for frame, name in ((orders, "orders"), (order_products, "order_products"), (products, "products")):
        require(frame, TABLES["instacart"][name], name)
    o = orders[["order_id", "user_id", "order_number", "order_hour_of_day", "days_since_prior_order"]].copy()
    o["order_number"] = pd.to_numeric(o["order_number"], errors="coerce")
    o["gap"] = pd.to_numeric(o["days_since_prior_order"], errors="coerce").fillna(0.0)
    o["hour"] = pd.to_numeric(o["order_hour_of_day"], errors="coerce").fillna(12).clip(0, 23)
    if o["order_number"].isna().any():
        row = int(np.flatnonzero(o["order_number"].isna().to_numpy())[0]) + 2
        raise DataError(f"orders: row {row}: order_number is not a number; fix or remove that row")
    o = o.sort_values(["user_id", "order_number"], kind="stable")
    # Days before the user's last order: the sum of the gaps that follow each order.
    after = o.groupby("user_id")["gap"].transform(lambda g: g[::-1].cumsum()[::-1].shift(-1, fill_value=0.0))
    end_ts = pd.Timestamp(datetime(end.year, end.month, end.day, tzinfo=timezone.utc))
    o["ts"] = end_ts - pd.to_timedelta(np.floor(after.to_numpy()), unit="D") + pd.to_timedelta(o["hour"], unit="h")
    lines = order_products[["order_id", "product_id"]].merge(o[["order_id", "user_id", "ts"]], on="order_id",
                                                             how="inner")
    lines = pd.DataFrame({"receipt_id": lines["order_id"].astype(str), "ts": lines["ts"],
                          "member_id": lines["user_id"].astype(str), "item_id": lines["product_id"].astype(str)})
    dept = {}
    if departments is not None:
        require(departments, ("department_id", "department"), "departments")
        dept = dict(zip(departments["department_id"].astype(str), departments["department"].astype(str)))
    dep = products["department_id"].astype(str)
    catalog = pd.DataFrame({"item_id": products["product_id"].astype(str), "name": products["product_name"].astype(str),
                            "category": [dept.get(d, f"department {d}") for d in dep],
                            "brand": products.get("aisle_id", pd.Series([""] * len(products))).astype(str),
                            "price": 0.0})
    catalog = catalog.drop_duplicates("item_id")
    lines = lines[lines["item_id"].isin(catalog["item_id"])]
    return _chain(lines, catalog, stores, "instacart")


def from_movielens(ratings: pd.DataFrame, movies: pd.DataFrame, stores: int) -> GeneratedChain:
    """MovieLens ratings as a chain of ``stores`` stores: one basket per member and day."""
    require(ratings, TABLES["movielens"]["ratings"], "ratings")
    require(movies, TABLES["movielens"]["movies"], "movies")
    seconds = pd.to_numeric(ratings["timestamp"], errors="coerce")
    if seconds.isna().any():
        row = int(np.flatnonzero(seconds.isna().to_numpy())[0]) + 2
        raise DataError(f"ratings: row {row}: timestamp is not a number of seconds; fix or remove that row")
    ts = pd.to_datetime(seconds, unit="s", utc=True)
    member = ratings["userId"].astype(str)
    day = ts.dt.strftime("%Y%m%d")
    lines = pd.DataFrame({"receipt_id": member + "-" + day, "member_id": member, "item_id": ratings["movieId"].astype(str),
                          "ts": ts})
    # One ts per receipt (the contract's rule): the day's first rating time.
    lines["ts"] = lines.groupby("receipt_id")["ts"].transform("min")
    lines = lines.drop_duplicates(["receipt_id", "item_id"])
    genres = movies["genres"].astype(str).str.split("|").str[0].replace({"": "unknown", "(no genres listed)": "unknown"})
    catalog = pd.DataFrame({"item_id": movies["movieId"].astype(str), "name": movies["title"].astype(str),
                            "category": genres, "brand": "", "price": 0.0}).drop_duplicates("item_id")
    lines = lines[lines["item_id"].isin(catalog["item_id"])]
    return _chain(lines, catalog, stores, "movielens")
