"""The store-local layer (DESIGN §5.1): the global model adapted to one store, without DP.

DP protects what leaves a store; what a store computes from its own data for its own
members, and keeps, needs none. The layer re-ranks the global model's log-probabilities
with what only the store knows, as a small log-linear blend over the store's assortment:

    s(m, i) = w_g·g + w_p·pop + b_i + [i ∉ H_m]·(w_k·knn + w_cat·cat + w_br·brand + w_e·ease + w_re·reach)
              + [i ∈ H_m]·(w_b + w_c·log1p(c) + w_r·r + w_gb·g + w_pb·pop + w_rr·rr)

* ``g``: the global model's log-probability of item i in member m's next basket;
* ``pop``: log(1 + units of i sold at this store in the training period), minus its max;
* ``knn``: how close i is to member m's own items among this store's members (mean cosine
  similarity of i to the items of H_m, over the store's member × item purchase matrix);
* ``[i ∈ H_m]``, ``c``, ``r``: whether m bought i before, in how many receipts, and how
  recently (``exp(−days since the last purchase / tau_days)``); the two interaction
  weights let the store weigh the global model and popularity differently for "buy
  again" and for new items;
* ``cat``, ``brand``: the member's affinity to the item's category / brand: log of their
  share of purchases in it, smoothed towards the store's share, over the store's share;
* ``ease``: EASE (Steck 2019) on the store's member × item matrix (off by default);
* ``reach``: log(1 + the store's members who bought i), popularity by buyers (off by default);
* ``rr``: the member's repeat ratio (share of their history lines that rebought an item), a
  logit, on their own items: whether this member buys again or explores;
* ``b``: optional per-item biases of this store (the "blend + biases" variant).

The explore terms (knn, cat, brand, ease, reach) score only items the member has not
bought: an own item is ranked by the own-history block alone, so the weights for "buy again"
and for "explore" are fitted apart. ``pop`` may spread its pseudo-count by the global
model's popularity (``pop_prior``), so an item the store never sold ranks as the chain's
model sees it instead of last.

The few weights (and biases) are fitted at the store on a **validation split cut from its
own training period** (histories up to ``cut − valid_days`` → each member's first basket
after that), by the softmax basket likelihood over the store's assortment, with an L2 pull
towards "the global model alone" (w_g = 1, the rest 0), so a small store stays close to it.

Nothing here is sent and nothing here feeds training: :func:`adapt` reads a copy of the
global model's scores and the store's data and returns a value the store keeps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse

from common.data.dataset import Examples, ItemIndex, MemberLog, StoreData
from common.data.holdout import validation_split as split
from common.learning.training import predict

FEATURES = ("global", "store_pop", "item_knn", "bought", "log_count", "recency", "global_bought", "pop_bought",
            "category", "brand", "ease", "repeat_ratio", "reach")
N_FEATURES = len(FEATURES)
PRIOR = np.array([1.0] + [0.0] * (N_FEATURES - 1))  # the global model alone
_DENSE = ("item_knn", "category", "brand", "ease", "reach")  # member × item features (the others are per item or sparse)
_FLOOR = -50.0  # log-probabilities below this (≈ 0) do not steer the fit


@dataclass(frozen=True)
class LocalConfig:
    """How the layer is fitted."""

    # The blend's active features (the others stay at the prior). Measured on 5 stores of seed 2
    # (DP ε = 8 global model, simulations/README.md "Quality"): category, brand (fitted apart from the
    # own-history block) and repeat_ratio took explore from 0.0674 to 0.0804 and "all" from
    # 0.4150 to 0.4160; ease on top added +0.0015 explore, item_knn +0.0007: within noise,
    # for an item × item matrix per store and up to twice the fitting time; so they are off.
    features: tuple[str, ...] = tuple(f for f in FEATURES if f not in ("item_knn", "ease", "reach"))
    item_biases: bool = False  # fit per-item biases too (the "blend + biases" variant)
    valid_days: int = 28  # the validation period: the last days of the training period
    tau_days: float = 30.0  # recency decay of the member's own purchases
    weight_l2: float = 2.0  # pull of the weights towards PRIOR, divided by the members fitted on
    bias_l2: float = 20.0  # pull of the item biases towards 0, likewise
    iterations: int = 60  # L-BFGS iterations
    ease_l2: float = 200.0  # EASE's ridge λ (item × item regression on the store's member × item matrix)
    group_pseudo: float = 5.0  # category/brand affinity: pseudo-purchases drawn from the store's shares
    repeat_pseudo: float = 2.0  # repeat ratio: pseudo-lines at a ratio of 1/2
    pop_prior: bool = False  # store_pop: spread the pseudo-count by the global model's popularity
    # At most this many validation members are fitted on (spread evenly over the store's
    # members): 13 weights need a few hundred baskets, and the fit's cost and memory grow with
    # members × catalog (a 10k-member store took minutes and 3.9 GB with every member).
    # Measured on 5 stores of seed 2 (ε 8 / ε 1 models): every member 0.4160 / 0.4168 NDCG@10,
    # 300 of them 0.4164 / 0.4166, the fits 27 s → 7 s and 48 s → 16 s.
    fit_members: int = 300


@dataclass
class StoreSide:
    """What the store-local features read besides the member: item × item matrices from the
    store's own members, and the item → category/brand groups with the store's sales shares."""

    similarity: sparse.csr_matrix | None = None  # item cosine similarity (item_knn)
    ease_items: np.ndarray | None = None  # the items EASE scores (rows/columns of ease)
    ease: np.ndarray | None = None  # [len(ease_items)]², zero diagonal
    groups: dict = field(default_factory=dict)  # "category"/"brand" → (item → group [n_items], group share [G])
    reach: np.ndarray | None = None  # [n_items] log(1 + members who bought the item), minus its max
    group_pseudo: float = 5.0
    repeat_pseudo: float = 2.0


@dataclass
class Histories:
    """Each member's own purchases before ``at_day``: distinct items, receipts holding each, last day."""

    items: list[np.ndarray]
    counts: list[np.ndarray]
    last_day: list[np.ndarray]
    at_day: float

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, rows) -> Histories:
        return Histories([self.items[n] for n in rows], [self.counts[n] for n in rows],
                         [self.last_day[n] for n in rows], self.at_day)


@dataclass
class LocalLayer:
    """One store's fitted layer; :meth:`scores` turns global log-probabilities into its own."""

    weights: np.ndarray  # [N_FEATURES], in FEATURES order
    item_bias: np.ndarray  # [n_items]
    store_pop: np.ndarray  # [n_items]: the pop feature
    similarity: sparse.csr_matrix | None  # [n_items, n_items] item cosine similarity (None: item_knn off)
    tau_days: float
    fitted_on: int = 0  # validation members the weights were fitted on (0: the prior, unfitted)
    valid_loss: dict = field(default_factory=dict)  # mean basket loss on the validation split
    # The store-side inputs of the other member-similarity terms (StoreSide, kept flat so that
    # common.learning.layer_codec writes them as plain arrays and numbers); None: term off.
    ease_items: np.ndarray | None = None
    ease: np.ndarray | None = None
    item_category: np.ndarray | None = None
    category_share: np.ndarray | None = None
    item_brand: np.ndarray | None = None
    brand_share: np.ndarray | None = None
    reach: np.ndarray | None = None
    group_pseudo: float = 5.0
    repeat_pseudo: float = 2.0

    def scores(self, global_logp: np.ndarray, histories: Histories) -> np.ndarray:
        """The store's scores of every catalog item for each member, [N, n_items]."""
        g = torch.as_tensor(np.maximum(global_logp, _FLOOR), dtype=torch.float32)  # serving: float32, like the model
        feats = {k: v.to(torch.float32) if v.is_floating_point() else v
                 for k, v in _features(histories, self._side(), self.tau_days, g.shape[1]).items()}
        return _blend(g, feats, torch.as_tensor(self.store_pop, dtype=torch.float32),
                      torch.as_tensor(self.weights, dtype=torch.float32),
                      torch.as_tensor(self.item_bias, dtype=torch.float32)).numpy()

    def _side(self) -> StoreSide:
        groups = {name: (grp, share) for name, grp, share in (("category", self.item_category, self.category_share),
                                                              ("brand", self.item_brand, self.brand_share))
                  if grp is not None and share is not None}
        return StoreSide(self.similarity, self.ease_items, self.ease, groups, self.reach, self.group_pseudo,
                         self.repeat_pseudo)

    def set_side(self, side: StoreSide) -> None:
        """Keep ``side``'s inputs (the serving ones, after a fit on the validation ones)."""
        self.similarity, self.ease_items, self.ease, self.reach = side.similarity, side.ease_items, side.ease, side.reach
        self.item_category, self.category_share = side.groups.get("category", (None, None))
        self.item_brand, self.brand_share = side.groups.get("brand", (None, None))
        self.group_pseudo, self.repeat_pseudo = side.group_pseudo, side.repeat_pseudo


def store_pop_feature(store_counts: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """log(units sold + pseudo-count), shifted so the best seller scores 0.

    The pseudo-counts total one unit per catalog item: 1 each (log(1 + units)) without
    ``prior``, else spread in proportion to ``prior`` (e.g. the global model's popularity), so
    an item this store never sold ranks by what the chain's model thinks of it."""
    counts = np.maximum(np.asarray(store_counts, dtype=float), 0.0)
    if prior is None:
        pseudo = np.ones_like(counts)
    else:
        p = np.maximum(np.asarray(prior, dtype=float), 0.0)
        pseudo = len(counts) * p / p.sum() if p.sum() > 0 else np.ones_like(counts)
    f = np.log(counts + np.maximum(pseudo, 1e-12))
    return f - f.max(initial=0.0)


def ease_matrix(histories: Histories, n_items: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """EASE (Steck 2019) on the members' purchase sets: (items, B) with B = I − P·diag(1/diag P),
    P = (XᵀX + λI)⁻¹ over the items someone bought; a member's score of item j is Σ_{i∈H} B[i, j]."""
    x = _member_matrix(histories, n_items, binary=True)
    items = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)
    if len(items) == 0:
        return items, np.zeros((0, 0))
    gram = (x[:, items].T @ x[:, items]).toarray() + l2 * np.eye(len(items))
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return items, b


def group_shares(groups: np.ndarray, n_groups: int, store_counts: np.ndarray) -> np.ndarray:
    """The store's share of units in each group, with one pseudo-unit per group (never 0)."""
    c = np.bincount(groups, weights=np.maximum(np.asarray(store_counts, dtype=float), 0.0), minlength=n_groups)
    return (c + 1.0) / (c.sum() + n_groups)


def store_side(histories: Histories, items: ItemIndex, store_counts: np.ndarray, cfg: LocalConfig) -> StoreSide:
    """The :class:`StoreSide` of the active features, from ``histories`` (the store's members)."""
    side = StoreSide(group_pseudo=cfg.group_pseudo, repeat_pseudo=cfg.repeat_pseudo)
    if "item_knn" in cfg.features:
        side.similarity = item_similarity(histories, items.n_items)
    if "ease" in cfg.features:
        side.ease_items, side.ease = ease_matrix(histories, items.n_items, cfg.ease_l2)
    if "reach" in cfg.features:
        side.reach = reach_feature(histories, items.n_items)
    for name, grp, n in (("category", items.category, items.n_categories), ("brand", items.brand, items.n_brands)):
        if name in cfg.features:
            side.groups[name] = (np.asarray(grp, dtype=np.int64), group_shares(grp, n, store_counts))
    return side


def reach_feature(histories: Histories, n_items: int) -> np.ndarray:
    """log(1 + the store's members who bought each item), shifted so the widest-bought scores 0:
    popularity by buyers rather than units, which a few members' staples inflate."""
    buyers = np.bincount(np.concatenate(histories.items or [np.empty(0, np.int64)]).astype(np.int64),
                         minlength=n_items).astype(float)
    f = np.log1p(buyers)
    return f - f.max(initial=0.0)


def _member_matrix(h: Histories, n_items: int, binary: bool) -> sparse.csr_matrix:
    rows = np.concatenate([np.full(len(i), n) for n, i in enumerate(h.items)] or [np.empty(0, np.int64)])
    cols = np.concatenate(h.items or [np.empty(0, np.int64)]).astype(np.int64)
    vals = np.ones(len(cols)) if binary else np.concatenate(h.counts or [np.empty(0)]).astype(float)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(len(h), n_items))


def item_similarity(histories: Histories, n_items: int) -> sparse.csr_matrix:
    """Cosine similarity of items over the members' purchase sets (an item is not its own neighbour)."""
    rows = np.concatenate([np.full(len(i), n) for n, i in enumerate(histories.items)] or [np.empty(0, np.int64)])
    cols = np.concatenate(histories.items or [np.empty(0, np.int64)]).astype(np.int64)
    x = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(histories), n_items))
    co = (x.T @ x).tocsr()
    norm = np.sqrt(np.asarray(co.diagonal()))
    inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    sim = sparse.diags(inv) @ co @ sparse.diags(inv)
    sim.setdiag(0.0)
    sim.eliminate_zeros()
    return sim.tocsr()


def _features(h: Histories, side: StoreSide, tau: float, n_items: int) -> dict:
    """The member-dependent features: dense knn, category, brand, ease [N, I] (or a broadcast
    zero when off), and the sparse own-history terms."""
    similarity = side.similarity
    rows = np.concatenate([np.full(len(i), n, np.int64) for n, i in enumerate(h.items)] or [np.empty(0, np.int64)])
    items = np.concatenate(h.items or [np.empty(0, np.int64)]).astype(np.int64)
    counts = np.concatenate(h.counts or [np.empty(0)]).astype(float)
    last = np.concatenate(h.last_day or [np.empty(0)]).astype(float)
    recency = np.exp(-np.maximum(h.at_day - last, 0.0) / tau)
    sizes = np.array([len(i) for i in h.items], dtype=float)
    share = 1.0 / np.maximum(sizes[rows], 1.0) if len(rows) else np.empty(0)
    if similarity is None:
        knn = np.zeros((1, 1))  # broadcasts: no item × item term (item_knn off)
    else:
        x = sparse.csr_matrix((share, (rows, items)), shape=(len(h), n_items))
        knn = np.asarray((x @ similarity).todense()) if len(h) else np.zeros((0, n_items))
    zero = np.zeros((1, 1))
    out = {"rows": torch.as_tensor(rows), "items": torch.as_tensor(items), "knn": torch.as_tensor(knn),
           "log_count": torch.as_tensor(np.log1p(counts)), "recency": torch.as_tensor(recency)}
    for name in ("category", "brand"):
        out[name] = torch.as_tensor(_group_lift(h, *side.groups[name], side.group_pseudo)
                                    if name in side.groups else zero)
    ease = zero
    if side.ease is not None:
        ease = np.zeros((len(h), n_items))
        if len(h) and len(side.ease_items):
            col = np.full(n_items, -1)
            col[side.ease_items] = np.arange(len(side.ease_items))
            known = col[items] >= 0
            x = sparse.csr_matrix((np.ones(int(known.sum())), (rows[known], col[items[known]])),
                                  shape=(len(h), len(side.ease_items)))
            ease[:, side.ease_items] = x @ side.ease
    out["ease"] = torch.as_tensor(ease)
    out["reach"] = torch.as_tensor(side.reach[None, :] if side.reach is not None else zero)
    # The member's repeat ratio: of the lines in their history, the share that rebought an
    # item (Σ receipts per item − distinct items) / Σ receipts, pulled to 1/2; as a logit.
    total = np.array([c.sum() for c in h.counts], dtype=float)
    ratio = (total - sizes + 0.5 * side.repeat_pseudo) / (total + side.repeat_pseudo)
    out["repeat_ratio"] = torch.as_tensor(np.log(ratio / (1.0 - ratio))[rows] if len(rows) else np.empty(0))
    return out


def _group_lift(h: Histories, groups: np.ndarray, share: np.ndarray, pseudo: float) -> np.ndarray:
    """log of the member's smoothed share of purchases in each item's group over the store's
    share: (n_mg + a·q_g) / ((n_m + a)·q_g), gathered per item; 0 for a member with no history."""
    n = np.zeros((len(h), len(share)))
    for r, (items, counts) in enumerate(zip(h.items, h.counts)):
        np.add.at(n[r], groups[items], counts)
    lift = np.log((n + pseudo * share[None, :]) / ((n.sum(axis=1, keepdims=True) + pseudo) * share[None, :]))
    return lift[:, groups]


def _blend(g: torch.Tensor, f: dict, pop: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    rows, items = f["rows"], f["items"]
    s = (w[0] * g + w[1] * pop + w[2] * f["knn"] + w[8] * f["category"] + w[9] * f["brand"] + w[10] * f["ease"]
         + w[12] * f["reach"] + bias)
    own = (w[3] + w[4] * f["log_count"] + w[5] * f["recency"] + w[6] * g[rows, items] + w[7] * pop[items]
           + w[11] * f["repeat_ratio"])
    # The "explore" terms rank what the member has not bought yet; an item they did buy is
    # ranked by the own-history block alone, so the two are fitted apart.
    for k, name in ((2, "knn"), (8, "category"), (9, "brand"), (10, "ease"), (12, "reach")):
        x = f[name]
        if x.shape[1] > 1:  # an active term ([N, I], or [1, I] for the same value for everyone)
            own = own - w[k] * (x[rows, items] if x.shape[0] > 1 else x[0, items])
    return s.index_put((rows, items), own, accumulate=True)


def member_histories(log: MemberLog, members: np.ndarray, upto: np.ndarray, at_day: float) -> Histories:
    """Histories of ``members`` (rows of ``log``) from their first ``upto[m]`` receipts."""
    h_items, h_counts, h_last = [], [], []
    for m in members:
        r0, r1 = log.receipt_ptr[m], log.receipt_ptr[m] + upto[m]
        line_items = log.line_item[log.line_ptr[r0]:log.line_ptr[r1]]
        line_day = np.repeat(log.receipt_day[r0:r1], np.diff(log.line_ptr[r0:r1 + 1]))
        u, inv = np.unique(line_items, return_inverse=True)
        counts = np.bincount(inv, minlength=len(u)).astype(float)  # lines = receipts holding the item
        last = np.full(len(u), -np.inf)
        np.maximum.at(last, inv, line_day)
        h_items.append(u)
        h_counts.append(counts)
        h_last.append(last)
    return Histories(h_items, h_counts, h_last, float(at_day))


def validation_split(data: StoreData, valid_days: int) -> tuple[Examples, Histories, list[np.ndarray], Histories]:
    """The store's validation split (:func:`common.data.holdout.validation_split`) with
    the members' histories at its cut, and every training member's history there (for the
    similarities). Only the training period is read, never the test period."""
    v = split(data, valid_days)
    everyone = member_histories(data.train_log, np.arange(data.n_train_members), v.upto, v.day)
    return v.examples, everyone.subset(v.members), v.targets, everyone


def test_histories(data: StoreData) -> Histories:
    """The evaluated members' whole pre-cut histories, as the layer reads them at the cut."""
    return Histories(data.eval_history_items, data.eval_history_counts, data.eval_history_last_day, data.cut_day)


def training_member_histories(data: StoreData) -> Histories:
    """Every training member's whole pre-cut history (audiences rank these members)."""
    log = data.train_log
    return member_histories(log, np.arange(data.n_train_members), log.n_receipts(), data.cut_day)


def serving_similarity(data: StoreData) -> sparse.csr_matrix:
    """Item similarities from every training member's whole pre-cut history (what serving uses)."""
    return item_similarity(training_member_histories(data), data.items.n_items)


def _basket_loss(s: torch.Tensor, allowed: torch.Tensor, t_rows: torch.Tensor, t_items: torch.Tensor,
                 t_weight: torch.Tensor) -> torch.Tensor:
    """Mean over members of the mean −log softmax (over the assortment) of their basket's items."""
    logz = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=1)
    return -((s[t_rows, t_items] - logz[t_rows]) * t_weight).sum()


def fit(global_logp: np.ndarray, histories: Histories, targets: list[np.ndarray], store_counts: np.ndarray,
        assortment: np.ndarray, similarity: sparse.csr_matrix, cfg: LocalConfig = LocalConfig(),
        side: StoreSide | None = None) -> LocalLayer:
    """Fit the blend (and biases) on a validation split; see the module docstring.

    ``global_logp`` [N, n_items]: the global model's scores of the validation members;
    ``targets[n]``: their validation baskets; ``similarity``: item similarities from the
    histories at the validation cut. Target items outside the assortment cannot be ranked
    and are left out; members left with none are not fitted on. The returned layer keeps
    ``similarity``; the caller swaps in the serving one (:func:`serving_similarity`).
    ``side``: the other store-side inputs at the validation cut (:func:`store_side`), kept
    likewise; the caller swaps in the serving ones.
    """
    unknown = set(cfg.features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown local-layer features {sorted(unknown)}; known: {', '.join(FEATURES)}")
    n_items = global_logp.shape[1]
    side = dataclasses.replace(side or StoreSide(), similarity=similarity)
    # The global model's popularity at this store: its mean next-basket probability over members.
    model_pop = np.exp(np.asarray(global_logp, dtype=float)).mean(axis=0) if cfg.pop_prior and len(global_logp) else None
    pop = store_pop_feature(store_counts, model_pop)
    allowed = np.asarray(assortment, dtype=bool)
    keep = [n for n, t in enumerate(targets) if allowed[t].any()]
    if not keep:
        return _with_side(LocalLayer(PRIOR.copy(), np.zeros(n_items), pop, similarity, cfg.tau_days), side)
    t = [targets[n][allowed[targets[n]]] for n in keep]
    g = torch.as_tensor(np.maximum(global_logp[keep], _FLOOR), dtype=torch.float64)
    feats = _features(histories.subset(keep), side, cfg.tau_days, n_items)
    t_rows = torch.as_tensor(np.concatenate([np.full(len(x), r) for r, x in enumerate(t)]))
    t_items = torch.as_tensor(np.concatenate(t))
    t_weight = torch.as_tensor(np.concatenate([np.full(len(x), 1.0 / (len(x) * len(t))) for x in t]))
    allowed_t = torch.as_tensor(allowed)[None, :].expand(len(keep), -1)
    pop_t = torch.as_tensor(pop)
    prior = torch.as_tensor(PRIOR)
    active = torch.as_tensor([f in cfg.features for f in FEATURES], dtype=torch.float64)
    delta = torch.zeros(N_FEATURES, dtype=torch.float64, requires_grad=True)  # w = prior + active·delta
    b = torch.zeros(n_items, dtype=torch.float64, requires_grad=cfg.item_biases)
    n = len(keep)

    def loss_at(w, bias):
        return _basket_loss(_blend(g, feats, pop_t, w, bias), allowed_t, t_rows, t_items, t_weight)

    opt = torch.optim.LBFGS([delta, b] if cfg.item_biases else [delta], lr=1.0, max_iter=cfg.iterations,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_at(prior + active * delta, b) + cfg.weight_l2 / n * (delta ** 2).sum()
        if cfg.item_biases:
            loss = loss + cfg.bias_l2 / n * (b ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        start = float(loss_at(prior, torch.zeros(n_items, dtype=torch.float64)))
    opt.step(closure)
    with torch.no_grad():
        w = (prior + active * delta).numpy().copy()
        bias = b.detach().numpy().copy()
        end = float(loss_at(torch.as_tensor(w), torch.as_tensor(bias)))
    if not (np.isfinite(w).all() and np.isfinite(bias).all() and end <= start):
        return _with_side(LocalLayer(PRIOR.copy(), np.zeros(n_items), pop, similarity, cfg.tau_days, n,
                                     {"prior": start}), side)
    return _with_side(LocalLayer(w, bias, pop, similarity, cfg.tau_days, n, {"prior": start, "fitted": end}), side)


def _with_side(layer: LocalLayer, side: StoreSide) -> LocalLayer:
    layer.set_side(side)
    return layer


def fit_rows(n: int, k: int) -> np.ndarray:
    """``k`` of ``n`` rows spread evenly (first and last included; all of them when k ≥ n)."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(k, 1)).round().astype(np.int64))


def subset_examples(ex: Examples, rows: np.ndarray) -> Examples:
    """The given rows of an example set."""
    return Examples(*(getattr(ex, f.name)[rows] for f in dataclasses.fields(ex)))


def adapt(global_model, data: StoreData, cfg: LocalConfig = LocalConfig()) -> LocalLayer:
    """The store's local layer on top of ``global_model`` (a :class:`Recommender`).

    Fitted on the store's training period (:func:`validation_split`), then set up to serve
    from the whole pre-cut history. Reads the model's scores; the model is not changed.
    """
    ex, hist, targets, everyone = validation_split(data, cfg.valid_days)
    if len(ex) > cfg.fit_members:
        rows = fit_rows(len(ex), cfg.fit_members)
        ex, hist, targets = subset_examples(ex, rows), hist.subset(rows), [targets[r] for r in rows]
    if len(ex):
        side = store_side(everyone, data.items, data.store_counts, cfg)
        layer = fit(predict(global_model, ex), hist, targets, data.store_counts, data.assortment, side.similarity,
                    cfg, side)
    else:
        layer = LocalLayer(PRIOR.copy(), np.zeros(data.items.n_items), store_pop_feature(data.store_counts),
                           None, cfg.tau_days)
    if layer.weights[[FEATURES.index(f) for f in _DENSE]].any():  # serve from every member's whole history
        layer.set_side(store_side(training_member_histories(data), data.items, data.store_counts, cfg))
    return layer
