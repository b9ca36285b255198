"""A store's tables → training and test examples (DESIGN §3, §4.1, §6). Pure: frames in.

* Rows are accounted for: every transaction row is accepted, excluded (with a reason) or
  quarantined (with a reason); ``StoreData.accounting`` holds the counts.
* Split by time: the last ``test_days`` days of the store's data are test.
* One training example per member per epoch: the member's history before a randomly
  chosen receipt → that receipt's basket. The privacy unit (one member) is one example.
* The test example of a member: the whole pre-cut history → their first basket after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common.data import contract

_EPOCH = pd.Timestamp(0, tz="UTC")


def days_since_epoch(ts: pd.Series) -> np.ndarray:
    """UTC timestamps → float days since 1970-01-01 (NaN for NaT), whatever the resolution."""
    return ((ts - _EPOCH) / pd.Timedelta(days=1)).to_numpy(dtype=float, na_value=np.nan)


@dataclass(frozen=True)
class ExampleConfig:
    """Shapes and time constants of the history features."""

    history_len: int = 50  # distinct items kept per history (the most weighted)
    target_len: int = 20  # target items kept per basket
    tau_days: float = 45.0  # decay of a purchase's weight with age
    test_days: int = 28
    # A training example's history covers at least this share of the member's receipts, so
    # training sees histories as long as the test's (the whole pre-cut history) more often.
    min_history_share: float = 0.5


# Per history item: decayed quantity, log1p(receipts with it), recency of last purchase,
# share of the member's receipts that hold it.
HISTORY_FEATURES = 4
PROFILE_DIM = (
    len(contract.AGE_BAND_EDGES) + 2
    + len(contract.GENDERS) + 1
    + len(contract.TIERS) + 1
    + len(contract.TENURE_BAND_EDGES) + 2
)


@dataclass
class ItemIndex:
    """The public catalog as integer indices: item, category and brand of every item."""

    item_ids: np.ndarray
    category: np.ndarray
    brand: np.ndarray
    n_categories: int
    n_brands: int

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_catalog(cls, catalog: pd.DataFrame) -> "ItemIndex":
        cats, cat_idx = np.unique(catalog["category"].astype(str).to_numpy(), return_inverse=True)
        brands, brand_idx = np.unique(catalog["brand"].astype(str).to_numpy(), return_inverse=True)
        return cls(
            item_ids=catalog["item_id"].astype(str).to_numpy(),
            category=cat_idx.astype(np.int64),
            brand=brand_idx.astype(np.int64),
            n_categories=len(cats),
            n_brands=len(brands),
        )


@dataclass
class MemberLog:
    """Receipts of a set of members in CSR form, each member's receipts in time order."""

    receipt_ptr: np.ndarray  # [M+1] into receipt arrays
    receipt_day: np.ndarray  # [R] days since 1970-01-01 (float)
    line_ptr: np.ndarray  # [R+1] into line arrays
    line_item: np.ndarray  # [L] item index
    line_qty: np.ndarray  # [L] net quantity (> 0)

    def n_receipts(self) -> np.ndarray:
        return np.diff(self.receipt_ptr)


@dataclass
class Examples:
    """A batch-able set of examples; row n is one member."""

    hist_items: np.ndarray  # [N, H] int64, padded with 0 where hist_mask is 0
    hist_feat: np.ndarray  # [N, H, HISTORY_FEATURES] float32
    hist_mask: np.ndarray  # [N, H] float32
    profile: np.ndarray  # [N, PROFILE_DIM] float32
    target_items: np.ndarray  # [N, T] int64
    target_mask: np.ndarray  # [N, T] float32

    def __len__(self) -> int:
        return len(self.hist_items)


def concat_examples(parts: list[Examples]) -> Examples:
    """Rows of several example sets, one after the other (same history and target shapes)."""
    fields = ("hist_items", "hist_feat", "hist_mask", "profile", "target_items", "target_mask")
    return Examples(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


@dataclass
class StoreData:
    """Everything a store needs to train and evaluate, built from its accepted rows."""

    store_id: str
    items: ItemIndex
    cut_day: float
    member_ids: np.ndarray  # consenting members homed here with training history, [M]: the DP-trained ones
    train_log: MemberLog  # their receipts before the cut
    profile: np.ndarray  # [M, PROFILE_DIM]
    eval_member_ids: np.ndarray  # consenting members with a basket after the cut, [E]
    eval_examples: Examples
    eval_targets: list[np.ndarray]  # full target sets (not truncated), [E]
    eval_history_items: list[np.ndarray]  # distinct items bought before the cut, [E]
    eval_history_counts: list[np.ndarray]  # receipts holding each of those items, [E]
    eval_history_last_day: list[np.ndarray]  # day each was last bought, [E]
    assortment: np.ndarray  # bool [n_items]: items sold in the training period
    store_counts: np.ndarray  # float [n_items]: units sold in the training period
    accounting: dict = field(default_factory=dict)
    example_cfg: ExampleConfig = ExampleConfig()  # how its examples are built
    # Audience ("goods find people"): the test period's best sellers, which training
    # members bought each of them then, and how much each member bought before the cut.
    audience_items: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    audience_bought: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))  # [M, items]
    member_activity: np.ndarray = field(default_factory=lambda: np.empty(0))  # units before the cut, [M]

    @property
    def n_train_members(self) -> int:
        return len(self.member_ids)


def _profile_matrix(members: pd.DataFrame, ref_day: float) -> np.ndarray:
    """One-hot age band, gender, tier and tenure band (each with an 'unknown' slot)."""
    n = len(members)
    ref_year = (np.datetime64(0, "D") + int(ref_day)).astype("datetime64[Y]").astype(int) + 1970
    by = pd.to_numeric(members.get("birth_year", pd.Series([""] * n)), errors="coerce").to_numpy()
    lo, hi = contract.BIRTH_YEAR_RANGE
    age = ref_year - by
    age_band = np.where((by >= lo) & (by <= hi), np.digitize(age, contract.AGE_BAND_EDGES), len(contract.AGE_BAND_EDGES) + 1)
    gender_col = members.get("gender", pd.Series([""] * n)).astype(str).str.strip().str.lower()
    gender = np.array([contract.GENDERS.index(g) if g in contract.GENDERS else len(contract.GENDERS) for g in gender_col])
    tier_col = members.get("tier", pd.Series([""] * n)).astype(str).str.strip().str.lower()
    tier = np.array([contract.TIERS.index(t) if t in contract.TIERS else len(contract.TIERS) for t in tier_col])
    from common.data.validation import parse_timestamps

    join_day = days_since_epoch(parse_timestamps(members["join_date"].astype(str)))
    join = pd.Series(np.isnan(join_day), index=members.index)
    tenure = ref_day - join_day
    tenure_band = np.where(join.to_numpy(), len(contract.TENURE_BAND_EDGES) + 1, np.digitize(tenure, contract.TENURE_BAND_EDGES))
    sizes = (len(contract.AGE_BAND_EDGES) + 2, len(contract.GENDERS) + 1, len(contract.TIERS) + 1, len(contract.TENURE_BAND_EDGES) + 2)
    out = np.zeros((n, sum(sizes)), dtype=np.float32)
    offset = 0
    for size, idx in zip(sizes, (age_band, gender, tier, tenure_band)):
        out[np.arange(n), offset + idx] = 1.0
        offset += size
    return out



def _member_log(lines: pd.DataFrame, member_order: np.ndarray) -> MemberLog:
    """CSR receipts of ``member_order`` members from accepted lines (any order)."""
    pos = pd.Index(member_order).get_indexer(lines["member"])
    lines = lines.assign(pos=pos)[pos >= 0]
    lines = lines.sort_values(["pos", "day", "receipt", "item"], kind="stable")
    pos_arr, receipt_arr = lines["pos"].to_numpy(), lines["receipt"].to_numpy()
    new_receipt = np.ones(len(lines), dtype=bool)
    new_receipt[1:] = (pos_arr[1:] != pos_arr[:-1]) | (receipt_arr[1:] != receipt_arr[:-1])
    receipt_starts = np.flatnonzero(new_receipt)
    receipt_member = lines["pos"].to_numpy()[receipt_starts]
    receipt_ptr = np.searchsorted(receipt_member, np.arange(len(member_order) + 1))
    return MemberLog(
        receipt_ptr=receipt_ptr.astype(np.int64),
        receipt_day=lines["day"].to_numpy()[receipt_starts],
        line_ptr=np.append(receipt_starts, len(lines)).astype(np.int64),
        line_item=lines["item"].to_numpy().astype(np.int64),
        line_qty=lines["qty"].to_numpy().astype(np.float32),
    )


def history_arrays(log: MemberLog, upto: np.ndarray, at_day: np.ndarray, cfg: ExampleConfig):
    """History features of member m from their first ``upto[m]`` receipts, seen at ``at_day[m]``.

    Returns ``(items [M,H], feat [M,H,F], mask [M,H])``; the H most weighted distinct items.
    """
    m_count = len(upto)
    first = log.line_ptr[log.receipt_ptr[:-1]]
    last = log.line_ptr[log.receipt_ptr[:-1] + upto]
    n_lines = last - first
    member = np.repeat(np.arange(m_count), n_lines)
    line = np.concatenate([np.arange(a, b) for a, b in zip(first, last)]) if n_lines.sum() else np.empty(0, np.int64)
    receipt_of_line = np.searchsorted(log.line_ptr, line, side="right") - 1
    age = at_day[member] - log.receipt_day[receipt_of_line]
    decay = np.exp(-age / cfg.tau_days)
    item = log.line_item[line]
    qty = np.minimum(log.line_qty[line], 3.0)
    n_items_total = int(item.max(initial=0)) + 1
    key = member * n_items_total + item
    uniq, inv = np.unique(key, return_inverse=True)
    w = np.bincount(inv, weights=qty * decay, minlength=len(uniq))
    count = np.bincount(inv, minlength=len(uniq)).astype(float)
    recency = np.zeros(len(uniq))
    np.maximum.at(recency, inv, decay)
    u_member = uniq // n_items_total
    u_item = uniq % n_items_total
    share = count / np.maximum(upto[u_member], 1)
    # Keep the H most weighted items per member: sort by (member, -weight), rank in member.
    order = np.lexsort((-w, u_member))
    u_member, u_item, w, count, recency, share = (a[order] for a in (u_member, u_item, w, count, recency, share))
    start = np.searchsorted(u_member, np.arange(m_count))
    rank = np.arange(len(u_member)) - start[u_member]
    keep = rank < cfg.history_len
    h = cfg.history_len
    items = np.zeros((m_count, h), dtype=np.int64)
    feat = np.zeros((m_count, h, HISTORY_FEATURES), dtype=np.float32)
    mask = np.zeros((m_count, h), dtype=np.float32)
    r, c = u_member[keep], rank[keep]
    items[r, c] = u_item[keep]
    feat[r, c] = np.stack([w[keep], np.log1p(count[keep]), recency[keep], share[keep]], axis=1)
    mask[r, c] = 1.0
    return items, feat, mask


def _item_counts(log: MemberLog, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Member m's distinct items, the number of receipts holding each, and its last day."""
    r0, r1 = log.receipt_ptr[m], log.receipt_ptr[m + 1]
    lines = np.arange(log.line_ptr[r0], log.line_ptr[r1])
    if len(lines) == 0:
        return np.empty(0, np.int64), np.empty(0), np.empty(0)
    day = log.receipt_day[np.searchsorted(log.line_ptr, lines, side="right") - 1]
    items, inv, counts = np.unique(log.line_item[lines], return_inverse=True, return_counts=True)
    last = np.full(len(items), -np.inf)
    np.maximum.at(last, inv, day)
    return items, counts.astype(float), last


def _targets(log: MemberLog, receipt: np.ndarray, t_len: int):
    """Items of each member's given receipt (absolute receipt index) as padded arrays."""
    items = np.zeros((len(receipt), t_len), dtype=np.int64)
    mask = np.zeros((len(receipt), t_len), dtype=np.float32)
    full = []
    for n, r in enumerate(receipt):
        basket = np.unique(log.line_item[log.line_ptr[r]:log.line_ptr[r + 1]])
        full.append(basket)
        k = min(len(basket), t_len)
        items[n, :k] = basket[:k]
        mask[n, :k] = 1.0
    return items, mask, full


def sample_train_examples(data: StoreData, rng: np.random.Generator, cfg: ExampleConfig | None = None) -> Examples:
    """One example per training member: history before a random receipt → its basket.

    The receipt is drawn uniformly from the later part of the member's receipts (at least
    ``cfg.min_history_share`` of them before it). Members with a single receipt get an empty
    history (the profile-only path).
    ``cfg`` defaults to the configuration the store's data was built with.
    """
    cfg = cfg or data.example_cfg
    log = data.train_log
    n_rec = log.n_receipts()
    # k in [lo, n-1] with lo = max(1, ⌈share·(n−1)⌉) when there are two receipts or more, else 0.
    lo = np.maximum(1, np.ceil(cfg.min_history_share * (n_rec - 1))).astype(np.int64)
    k = np.where(n_rec >= 2, lo + np.floor(rng.random(len(n_rec)) * np.maximum(n_rec - lo, 1)).astype(np.int64), 0)
    target_receipt = log.receipt_ptr[:-1] + k
    at_day = log.receipt_day[target_receipt]
    items, feat, mask = history_arrays(log, k, at_day, cfg)
    t_items, t_mask, _ = _targets(log, target_receipt, cfg.target_len)
    return Examples(items, feat, mask, data.profile, t_items, t_mask)


def build_store_data(store_id: str, lines: pd.DataFrame, anonymous: pd.DataFrame, members: pd.DataFrame,
                     items: ItemIndex, cfg: ExampleConfig = ExampleConfig(), accounting: dict | None = None) -> StoreData:
    """Split a store's accepted rows by time and build its member logs and test examples.

    ``lines``: accepted, consenting member purchase lines (member, item, day, qty, receipt)
    with returns already netted; ``anonymous``: anonymous purchases (item, day, qty), used
    for the assortment and popularity only; ``members``: accepted member rows (profiles).
    See :func:`common.data.ingest.validate_store`, which produces all three.
    """
    all_days = np.concatenate([lines["day"].to_numpy(), anonymous["day"].to_numpy()])
    if len(all_days) == 0:
        raise ValueError(f"store {store_id}: no usable transactions")
    last_day = np.floor(all_days.max())
    cut_day = last_day + 1 - cfg.test_days
    train = lines[lines["day"] < cut_day]
    test = lines[lines["day"] >= cut_day]

    # Assortment and popularity use all purchases of the training period, anonymous too.
    anon_train = anonymous[anonymous["day"] < cut_day]
    store_counts = np.bincount(
        np.concatenate([train["item"].to_numpy(), anon_train["item"].to_numpy()]).astype(np.int64),
        weights=np.concatenate([train["qty"].to_numpy(), anon_train["qty"].to_numpy()]),
        minlength=items.n_items,
    )
    assortment = store_counts > 0

    member_frame = members.assign(member_id=members["member_id"].astype(str).str.strip())
    member_frame = member_frame.drop_duplicates("member_id", keep=False).set_index("member_id", drop=False)
    train_ids = np.array(sorted(train["member"].unique()), dtype=object)
    # DP training only for members whose home store is this one: a member who shops at
    # several stores is one person and spends privacy at one store. Their receipts here
    # still count for the assortment, popularity and evaluation, which never enter the update.
    not_home = 0
    if "home_store" in member_frame.columns and len(train_ids):
        here = np.array([contract.trains_here(h, store_id) for h in member_frame["home_store"].reindex(train_ids)],
                        dtype=bool)
        not_home, train_ids = int((~here).sum()), train_ids[here]
    train_log = _member_log(train, train_ids)
    profile = _profile_matrix(member_frame.loc[train_ids], cut_day) if len(train_ids) else np.zeros((0, PROFILE_DIM), np.float32)

    # Test: every consenting member with a basket after the cut; history = all pre-cut receipts.
    eval_ids = np.array(sorted(test["member"].unique()), dtype=object)
    test_log = _member_log(test, eval_ids)
    first_test_receipt = test_log.receipt_ptr[:-1]
    hist_log = _member_log(train, eval_ids)
    upto = hist_log.n_receipts()
    h_items, h_feat, h_mask = history_arrays(hist_log, upto, np.full(len(eval_ids), cut_day), cfg)
    t_items, t_mask, t_full = _targets(test_log, first_test_receipt, cfg.target_len)
    eval_profile = _profile_matrix(member_frame.loc[eval_ids], cut_day) if len(eval_ids) else np.zeros((0, PROFILE_DIM), np.float32)
    eval_hist = [_item_counts(hist_log, m) for m in range(len(eval_ids))]
    accounting = dict(accounting or {}, train_members=int(len(train_ids)), eval_members=int(len(eval_ids)),
                      members_homed_elsewhere=not_home)
    audience_items, audience_bought, member_activity = _audience(train, test, anonymous, cut_day, train_ids,
                                                                 items.n_items)
    return StoreData(
        store_id=store_id,
        items=items,
        cut_day=float(cut_day),
        member_ids=train_ids,
        train_log=train_log,
        profile=profile,
        eval_member_ids=eval_ids,
        eval_examples=Examples(h_items, h_feat, h_mask, eval_profile, t_items, t_mask),
        eval_targets=t_full,
        eval_history_items=[h[0] for h in eval_hist],
        eval_history_counts=[h[1] for h in eval_hist],
        eval_history_last_day=[h[2] for h in eval_hist],
        assortment=assortment,
        store_counts=store_counts,
        accounting=accounting,
        example_cfg=cfg,
        audience_items=audience_items,
        audience_bought=audience_bought,
        member_activity=member_activity,
    )


def _audience(train: pd.DataFrame, test: pd.DataFrame, anonymous: pd.DataFrame, cut_day: float,
              members: np.ndarray, n_items: int, top: int = 50):
    """(best sellers of the test period, bought[member, item], units per member before the cut)."""
    anon_test = anonymous[anonymous["day"] >= cut_day]
    units = np.bincount(np.concatenate([test["item"].to_numpy(), anon_test["item"].to_numpy()]).astype(np.int64),
                        weights=np.concatenate([test["qty"].to_numpy(), anon_test["qty"].to_numpy()]),
                        minlength=n_items)
    best = np.argsort(-units, kind="stable")[:top]
    best = best[units[best] > 0]
    row = pd.Index(members).get_indexer(test["member"])
    col = pd.Index(best).get_indexer(test["item"])
    keep = (row >= 0) & (col >= 0)
    bought = np.zeros((len(members), len(best)), dtype=bool)
    bought[row[keep], col[keep]] = True
    activity = train.groupby("member")["qty"].sum().reindex(members).fillna(0.0).to_numpy(dtype=float)
    return best.astype(np.int64), bought, activity


# Public names for the serving API (client.serving.service), which builds the same features at the store.
profile_matrix = _profile_matrix
member_log = _member_log
