"""A synthetic retail chain (DESIGN §7), deterministic by seed.

The generator is a small generative story, so that a model which learns member tastes has
something real to find:

* items have a latent taste vector (category centroid + brand offset + noise) and a
  Zipf popularity;
* a member's taste is driven by their profile (age band, gender, tier) plus an individual
  part; each store's region shifts tastes (non-IID stores);
* every member has a few *staples* they re-buy (repeat purchases) and otherwise picks items
  from their taste distribution over the store's assortment;
* visits follow a weekly rhythm; ~10 % of members shop at a second store of the chain
  under the same card (members.csv's ``home_store`` names the store they registered at);
  some receipts are anonymous; a few lines are returns;
* each store.json declares a ``published_size`` (DESIGN §4.1).

Pure: no file I/O. :func:`generate_chain` returns frames; :mod:`common.data.storefiles` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
import pandas as pd

from common.privacy.published_size import bucket

CATEGORY_NAMES = (
    "dairy", "bakery", "produce", "meat", "seafood", "frozen", "snacks", "beverages",
    "coffee-tea", "breakfast", "pasta-rice", "canned", "sauces", "spices", "baking",
    "sweets", "baby", "pet", "household", "cleaning", "paper", "personal-care", "beauty",
    "health", "wine", "beer", "spirits", "deli", "cheese", "organic", "world-food",
    "ready-meals", "ice-cream", "juice", "water", "kitchen", "garden", "toys",
    "stationery", "electronics",
)
REGIONS = ("north", "south", "east", "west")


@dataclass(frozen=True)
class ChainSpec:
    """Sizes and shape of a generated chain; every default is DESIGN §7's."""

    stores: int = 20
    members: int = 10_000
    items: int = 2_000
    categories: int = 40
    brands: int = 200
    days: int = 365
    start: date = date(2025, 1, 1)
    seed: int = 0
    latent_dim: int = 8
    multi_store_share: float = 0.10
    anonymous_share: float = 0.20
    return_share: float = 0.005
    visits_per_month: float = 1.6
    mean_basket: float = 3.5
    min_store_members: int = 100
    zipf_exponent: float = 0.7  # how steeply item popularity falls with rank
    taste_strength: float = 1.1  # weight of member taste against popularity

    def __post_init__(self) -> None:
        if self.stores < 1:
            raise ValueError("a chain needs at least one store")
        if self.members < self.stores * 10:
            raise ValueError(f"{self.members} members are too few for {self.stores} stores")
        if not 2 <= self.categories <= len(CATEGORY_NAMES):
            raise ValueError(f"categories must be in 2..{len(CATEGORY_NAMES)}")
        if self.items < self.categories * 5:
            raise ValueError("items must be at least 5 per category")


MEMBERS_PER_STORE = 500


def default_spec(stores: int = 20, seed: int = 0) -> ChainSpec:
    """The default chain for a number of stores: 500 members a store (10,000 for 20)."""
    return ChainSpec(stores=stores, seed=seed, members=MEMBERS_PER_STORE * stores)


@dataclass
class GeneratedStore:
    """One store's files as frames, plus its store.json content."""

    store_id: str
    meta: dict
    transactions: pd.DataFrame
    members: pd.DataFrame


@dataclass
class GeneratedChain:
    spec: ChainSpec
    catalog: pd.DataFrame
    stores: list[GeneratedStore]


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def _store_sizes(spec: ChainSpec, rng: np.random.Generator) -> np.ndarray:
    """Log-normal store sizes, at least ``min_store_members``, summing to ``members``."""
    raw = rng.lognormal(mean=0.0, sigma=1.3, size=spec.stores)
    floor = min(spec.min_store_members, spec.members // spec.stores)
    spare = spec.members - floor * spec.stores
    sizes = floor + np.floor(raw / raw.sum() * spare).astype(int)
    sizes[np.argmax(sizes)] += spec.members - sizes.sum()
    return sizes


def _catalog(spec: ChainSpec, rng: np.random.Generator):
    """Items with category, brand, price, Zipf popularity and a latent taste vector."""
    n, k = spec.items, spec.latent_dim
    cat_names = np.array(CATEGORY_NAMES[: spec.categories])
    cat_weight = 1.0 / np.arange(1, spec.categories + 1) ** 0.6
    item_cat = rng.choice(spec.categories, size=n, p=cat_weight / cat_weight.sum())
    item_cat[: spec.categories] = np.arange(spec.categories)  # every category has items
    # Each brand belongs to one category; an item picks a brand of its own category.
    brand_cat = np.concatenate(
        [np.arange(spec.categories), rng.integers(0, spec.categories, spec.brands - spec.categories)]
    ) if spec.brands > spec.categories else np.arange(spec.brands) % spec.categories
    item_brand = np.empty(n, dtype=int)
    for c in range(spec.categories):
        own = np.flatnonzero(brand_cat == c)
        members = np.flatnonzero(item_cat == c)
        item_brand[members] = own[rng.integers(0, len(own), len(members))]
    cat_centroid = rng.normal(0, 1.0, (spec.categories, k))
    brand_offset = rng.normal(0, 0.5, (len(brand_cat), k))
    latent = cat_centroid[item_cat] + brand_offset[item_brand] + rng.normal(0, 0.5, (n, k))
    log_pop = -1.0 * np.log(rng.permutation(n) + 1.0)  # Zipf(1) by a random rank
    cat_price = rng.lognormal(1.2, 0.6, spec.categories)
    price = np.round(cat_price[item_cat] * rng.lognormal(0, 0.35, n), 2)
    item_ids = np.array([f"SKU{i:05d}" for i in range(n)])
    brand_names = np.array([f"{cat_names[brand_cat[b]]}-brand-{b:03d}" for b in range(len(brand_cat))])
    brand_col = brand_names[item_brand].astype(object)
    brand_col[rng.random(n) < 0.05] = ""  # private label / unbranded
    catalog = pd.DataFrame(
        {
            "item_id": item_ids,
            "name": [f"{cat_names[c]} item {i}" for i, c in enumerate(item_cat)],
            "category": cat_names[item_cat],
            "brand": brand_col,
            "price": price,
        }
    )
    return catalog, latent, log_pop, item_cat


def _profiles(spec: ChainSpec, rng: np.random.Generator, n: int, end: date):
    """Member profiles and the part of their taste the profile explains."""
    k = spec.latent_dim
    birth_year = rng.integers(1945, 2006, n)
    gender = rng.choice(np.array(["f", "m", "x", ""], dtype=object), n, p=[0.5, 0.42, 0.03, 0.05])
    tier = rng.choice(np.array(["basic", "silver", "gold"], dtype=object), n, p=[0.6, 0.3, 0.1])
    tenure_days = rng.integers(30, 6 * 365, n)
    join = np.array([end - timedelta(days=int(d)) for d in tenure_days])
    age_band = np.digitize(end.year - birth_year, [25, 35, 45, 55, 65])
    age_vec = rng.normal(0, 0.8, (6, k))
    gender_vec = {g: rng.normal(0, 0.6, k) for g in ("f", "m", "x", "")}
    tier_vec = {t: rng.normal(0, 0.4, k) for t in ("basic", "silver", "gold")}
    taste = (
        age_vec[age_band]
        + np.stack([gender_vec[g] for g in gender])
        + np.stack([tier_vec[t] for t in tier])
        + rng.normal(0, 0.7, (n, k))
    )
    frame = pd.DataFrame(
        {
            "join_date": [d.isoformat() for d in join],
            "birth_year": birth_year.astype(object),
            "gender": gender,
            "tier": tier,
        }
    )
    # A few members leave birth_year empty, as real sign-up forms allow.
    frame.loc[rng.random(n) < 0.04, "birth_year"] = ""
    frame["consent_training"] = np.where(rng.random(n) < 0.93, "true", "false")
    visit_rate = rng.lognormal(np.log(spec.visits_per_month * 12 / 365) - 0.18, 0.6, n)
    return frame, taste, visit_rate


def _day_weights(spec: ChainSpec) -> np.ndarray:
    """Weekly rhythm (busy Friday-Sunday) and a December peak."""
    days = [spec.start + timedelta(days=d) for d in range(spec.days)]
    weekday = np.array([1.0, 0.85, 0.9, 0.95, 1.2, 1.6, 1.3])
    w = np.array([weekday[d.weekday()] * (1.3 if d.month == 12 else 1.0) for d in days])
    return w / w.sum()


def generate_chain(spec: ChainSpec | None = None) -> GeneratedChain:
    """Generate a whole chain: catalog and, per store, transactions, members and metadata.

    Deterministic: the same ``spec`` (including ``seed``) gives identical frames.
    """
    spec = spec or ChainSpec()
    rng = np.random.default_rng(spec.seed)
    end = spec.start + timedelta(days=spec.days - 1)
    catalog, latent, log_pop, item_cat = _catalog(spec, rng)
    n_items = spec.items

    sizes = _store_sizes(spec, rng)
    region_of_store = rng.integers(0, len(REGIONS), spec.stores)
    region_taste = rng.normal(0, 0.6, (len(REGIONS), spec.latent_dim))
    store_ids = [f"S{s + 1:03d}" for s in range(spec.stores)]

    # Assortment: popular items everywhere, the long tail depends on store size and region.
    assortments = []
    for s in range(spec.stores):
        fit = latent @ region_taste[region_of_store[s]] / np.sqrt(spec.latent_dim)
        size_boost = np.log(sizes[s] / 100.0)
        logit = 4.0 + 0.6 * log_pop + 0.8 * fit + 0.7 * size_boost
        keep = rng.random(n_items) < 1.0 / (1.0 + np.exp(-logit))
        keep[np.argsort(-log_pop)[:100]] = True
        assortments.append(np.flatnonzero(keep))

    # People: a home store each; some also shop at a second store with the same card.
    n_people = spec.members
    home = np.repeat(np.arange(spec.stores), sizes)
    rng.shuffle(home)
    profiles, taste, visit_rate = _profiles(spec, rng, n_people, end)
    person_ids = np.array([f"M{p:06d}" for p in rng.permutation(np.arange(100000, 100000 + n_people))])
    second = np.full(n_people, -1)
    multi = np.flatnonzero(rng.random(n_people) < spec.multi_store_share)
    if spec.stores > 1:
        for p in multi:
            other = rng.integers(0, spec.stores - 1)
            second[p] = other if other < home[p] else other + 1
    repeat_prob = rng.beta(4, 4, n_people)
    day_p = _day_weights(spec)

    stores: list[GeneratedStore] = []
    for s in range(spec.stores):
        assort = assortments[s]
        base = spec.zipf_exponent * log_pop[assort]
        lat = latent[assort] + 0.0
        people = np.flatnonzero((home == s) | (second == s))
        rows = {k: [] for k in ("receipt", "day", "minute", "member", "item", "qty")}
        receipt_no = 0
        for p in people:
            share = 1.0 if second[p] < 0 else (0.7 if home[p] == s else 0.3)
            pref = base + spec.taste_strength * (lat @ (taste[p] + region_taste[region_of_store[s]])) / np.sqrt(spec.latent_dim)
            cdf = np.cumsum(_softmax(pref))
            n_staples = min(len(assort), 3 + rng.poisson(5))
            staples = np.searchsorted(cdf, rng.random(n_staples) * cdf[-1])
            n_visits = rng.poisson(visit_rate[p] * spec.days * share)
            if n_visits == 0:
                continue
            days = np.sort(rng.choice(spec.days, n_visits, p=day_p))
            sizes_b = 1 + rng.poisson(spec.mean_basket - 1, n_visits)
            basket = np.repeat(np.arange(n_visits), sizes_b)
            from_staple = rng.random(len(basket)) < repeat_prob[p]
            picks = np.where(
                from_staple,
                staples[rng.integers(0, len(staples), len(basket))],
                np.searchsorted(cdf, rng.random(len(basket)) * cdf[-1]),
            )
            key = np.unique(basket * len(assort) + picks)
            b, it = key // len(assort), key % len(assort)
            qty = 1 + (rng.random(len(b)) < 0.15) + (rng.random(len(b)) < 0.03)
            minutes = rng.integers(8 * 60, 21 * 60, n_visits)
            rows["receipt"].append(receipt_no + b)
            rows["day"].append(days[b])
            rows["minute"].append(minutes[b])
            rows["member"].append(np.full(len(b), p))
            rows["item"].append(assort[it])
            rows["qty"].append(qty)
            receipt_no += n_visits
        # Anonymous receipts: bought by popularity with the region's taste.
        n_anon = int(round(receipt_no * spec.anonymous_share / (1 - spec.anonymous_share)))
        if n_anon:
            pref = base + 0.8 * (lat @ region_taste[region_of_store[s]]) / np.sqrt(spec.latent_dim)
            cdf = np.cumsum(_softmax(pref))
            sizes_b = 1 + rng.poisson(spec.mean_basket - 1, n_anon)
            basket = np.repeat(np.arange(n_anon), sizes_b)
            key = np.unique(basket * len(assort) + np.searchsorted(cdf, rng.random(len(basket)) * cdf[-1]))
            b, it = key // len(assort), key % len(assort)
            rows["receipt"].append(receipt_no + b)
            rows["day"].append(rng.choice(spec.days, n_anon, p=day_p)[b])
            rows["minute"].append(rng.integers(8 * 60, 21 * 60, n_anon)[b])
            rows["member"].append(np.full(len(b), -1))
            rows["item"].append(assort[it])
            rows["qty"].append(np.ones(len(b), dtype=int))
            receipt_no += n_anon
        tx = {k: np.concatenate(v) if v else np.array([], dtype=int) for k, v in rows.items()}
        tx = _add_returns(spec, rng, tx, receipt_no)
        transactions = _transactions_frame(spec, rng, store_ids[s], tx, person_ids, catalog)
        members = profiles.iloc[people].copy()
        members.insert(0, "member_id", person_ids[people])
        # The chain's loyalty system knows where each card was registered: the home store.
        members["home_store"] = np.array(store_ids, dtype=object)[home[people]]
        members = members.sort_values("member_id", kind="stable").reset_index(drop=True)
        meta = {
            "store_id": store_ids[s],
            "name": f"Store {s + 1} ({REGIONS[region_of_store[s]]})",
            "region": REGIONS[region_of_store[s]],
            "opened": (spec.start - timedelta(days=int(rng.integers(400, 5000)))).isoformat(),
            # The size the store publishes (DESIGN §4.1): its registered home members rounded
            # up to the R10 grid, declared once as a setting (see common.privacy.published_size).
            "published_size": bucket(int((home == s).sum())),
        }
        stores.append(GeneratedStore(store_ids[s], meta, transactions, members))
    return GeneratedChain(spec=spec, catalog=catalog, stores=stores)


def _add_returns(spec: ChainSpec, rng: np.random.Generator, tx: dict, next_receipt: int) -> dict:
    """A few member purchases come back within two weeks as a one-line return receipt."""
    bought = np.flatnonzero(tx["member"] >= 0)
    picked = bought[rng.random(len(bought)) < spec.return_share]
    picked = picked[tx["day"][picked] < spec.days - 15]
    if len(picked) == 0:
        return tx
    out = {k: [v] for k, v in tx.items()}
    out["receipt"].append(next_receipt + np.arange(len(picked)))
    out["day"].append(tx["day"][picked] + rng.integers(1, 15, len(picked)))
    out["minute"].append(rng.integers(8 * 60, 21 * 60, len(picked)))
    out["member"].append(tx["member"][picked])
    out["item"].append(tx["item"][picked])
    out["qty"].append(-np.ones(len(picked), dtype=int))
    return {k: np.concatenate(v) for k, v in out.items()}


def _transactions_frame(spec, rng, store_id, tx, person_ids, catalog) -> pd.DataFrame:
    """Turn index arrays into the §3 transactions frame, ordered by time then receipt."""
    start = datetime.combine(spec.start, datetime.min.time())
    order = np.lexsort((tx["item"], tx["receipt"], tx["minute"], tx["day"]))
    tx = {k: v[order] for k, v in tx.items()}
    # Receipt ids follow time order, as a POS would number them.
    _, first = np.unique(tx["receipt"], return_index=True)
    rank = np.empty(len(first), dtype=int)
    rank[np.argsort(first)] = np.arange(len(first))
    receipt_rank = rank[np.searchsorted(np.unique(tx["receipt"]), tx["receipt"])]
    seconds = tx["day"].astype(np.int64) * 86400 + tx["minute"].astype(np.int64) * 60
    ts = (np.datetime64(start, "s") + seconds.astype("timedelta64[s]")).astype(str)
    n = len(order)
    promo_hit = rng.random(n) < 0.08
    week = tx["day"] // 7
    price = catalog["price"].to_numpy()[tx["item"]]
    channel = np.where(rng.random(n) < 0.15, "online", "pos")
    # One channel per receipt: take the channel drawn for the receipt's first line.
    channel = channel[first[np.searchsorted(np.unique(tx["receipt"]), tx["receipt"])] if n else []]
    member = np.where(tx["member"] >= 0, person_ids[np.maximum(tx["member"], 0)], "")
    return pd.DataFrame(
        {
            "receipt_id": [f"{store_id}-R{r:07d}" for r in receipt_rank],
            "ts": ts,
            "member_id": member,
            "item_id": catalog["item_id"].to_numpy()[tx["item"]],
            "quantity": tx["qty"].astype(int),
            "unit_price": np.round(np.where(promo_hit, price * 0.8, price), 2),
            "promo": np.where(promo_hit, [f"W{w:02d}" for w in week], ""),
            "channel": channel,
        }
    )
