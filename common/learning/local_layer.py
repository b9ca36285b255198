"""The store-local layer (DESIGN §5.1): the global model adapted to one store, without DP.

DP protects what leaves a store; what a store computes from its own data for its own
members, and keeps, needs none. The layer re-ranks the global model's log-probabilities
with what only the store knows, as a small log-linear blend over the store's assortment:

    s(m, i) = w_g·g + w_p·pop + w_k·knn + b_i
              + [i ∈ H_m]·(w_b + w_c·log1p(c) + w_r·r + w_gb·g + w_pb·pop)

* ``g``: the global model's log-probability of item i in member m's next basket;
* ``pop``: log(1 + units of i sold at this store in the training period), minus its max;
* ``knn``: how close i is to member m's own items among this store's members (mean cosine
  similarity of i to the items of H_m, over the store's member × item purchase matrix);
* ``[i ∈ H_m]``, ``c``, ``r``: whether m bought i before, in how many receipts, and how
  recently (``exp(−days since the last purchase / tau_days)``); the two interaction
  weights let the store weigh the global model and popularity differently for "buy
  again" and for new items;
* ``b``: optional per-item biases of this store (the "blend + biases" variant).

The few weights (and biases) are fitted at the store on a **validation split cut from its
own training period** (histories up to ``cut − valid_days`` → each member's first basket
after that), by the softmax basket likelihood over the store's assortment, with an L2 pull
towards "the global model alone" (w_g = 1, the rest 0), so a small store stays close to it.

Nothing here is sent and nothing here feeds training: :func:`adapt` reads a copy of the
global model's scores and the store's data and returns a value the store keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse

from common.data.dataset import Examples, MemberLog, StoreData

FEATURES = ("global", "store_pop", "item_knn", "bought", "log_count", "recency", "global_bought", "pop_bought")
N_FEATURES = len(FEATURES)
PRIOR = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # the global model alone
_FLOOR = -50.0  # log-probabilities below this (≈ 0) do not steer the fit


@dataclass(frozen=True)
class LocalConfig:
    """How the layer is fitted."""

    # The blend's active features (the others stay at the prior). Measured on 5 stores of seed 2
    # (DP ε = 8 global model), item_knn added +0.0004 NDCG@10 and +0.0007 explore: within
    # noise, for an item × item matrix per store and twice the fitting time; so it is off.
    features: tuple[str, ...] = tuple(f for f in FEATURES if f != "item_knn")
    item_biases: bool = False  # fit per-item biases too (the "blend + biases" variant)
    valid_days: int = 28  # the validation period: the last days of the training period
    tau_days: float = 30.0  # recency decay of the member's own purchases
    weight_l2: float = 2.0  # pull of the weights towards PRIOR, divided by the members fitted on
    bias_l2: float = 20.0  # pull of the item biases towards 0, likewise
    iterations: int = 60  # L-BFGS iterations


@dataclass
class Histories:
    """Each member's own purchases before ``at_day``: distinct items, receipts holding each, last day."""

    items: list[np.ndarray]
    counts: list[np.ndarray]
    last_day: list[np.ndarray]
    at_day: float

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, rows) -> "Histories":
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

    def scores(self, global_logp: np.ndarray, histories: Histories) -> np.ndarray:
        """The store's scores of every catalog item for each member, [N, n_items]."""
        g = torch.as_tensor(np.maximum(global_logp, _FLOOR), dtype=torch.float32)  # serving: float32, like the model
        feats = {k: v.to(torch.float32) if v.is_floating_point() else v
                 for k, v in _features(histories, self.similarity, self.tau_days, g.shape[1]).items()}
        return _blend(g, feats, torch.as_tensor(self.store_pop, dtype=torch.float32),
                      torch.as_tensor(self.weights, dtype=torch.float32),
                      torch.as_tensor(self.item_bias, dtype=torch.float32)).numpy()


def store_pop_feature(store_counts: np.ndarray) -> np.ndarray:
    """log(1 + units sold), shifted so the best seller scores 0."""
    f = np.log1p(np.maximum(np.asarray(store_counts, dtype=float), 0.0))
    return f - f.max(initial=0.0)


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


def _features(h: Histories, similarity: sparse.csr_matrix, tau: float, n_items: int) -> dict:
    """The member-dependent features: dense knn [N, I], and the sparse own-history terms."""
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
    return {"rows": torch.as_tensor(rows), "items": torch.as_tensor(items), "knn": torch.as_tensor(knn),
            "log_count": torch.as_tensor(np.log1p(counts)), "recency": torch.as_tensor(recency)}


def _blend(g: torch.Tensor, f: dict, pop: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    rows, items = f["rows"], f["items"]
    s = w[0] * g + w[1] * pop + w[2] * f["knn"] + bias
    own = w[3] + w[4] * f["log_count"] + w[5] * f["recency"] + w[6] * g[rows, items] + w[7] * pop[items]
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
    """The store's validation split (:func:`common.evaluation.holdout.validation_split`) with
    the members' histories at its cut, and every training member's history there (for the
    similarities). Only the training period is read, never the test period."""
    from common.evaluation.holdout import validation_split as split

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
        assortment: np.ndarray, similarity: sparse.csr_matrix, cfg: LocalConfig = LocalConfig()) -> LocalLayer:
    """Fit the blend (and biases) on a validation split; see the module docstring.

    ``global_logp`` [N, n_items]: the global model's scores of the validation members;
    ``targets[n]``: their validation baskets; ``similarity``: item similarities from the
    histories at the validation cut. Target items outside the assortment cannot be ranked
    and are left out; members left with none are not fitted on. The returned layer keeps
    ``similarity``; the caller swaps in the serving one (:func:`serving_similarity`).
    """
    unknown = set(cfg.features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown local-layer features {sorted(unknown)}; known: {', '.join(FEATURES)}")
    n_items = global_logp.shape[1]
    pop = store_pop_feature(store_counts)
    allowed = np.asarray(assortment, dtype=bool)
    keep = [n for n, t in enumerate(targets) if allowed[t].any()]
    if not keep:
        return LocalLayer(PRIOR.copy(), np.zeros(n_items), pop, similarity, cfg.tau_days)
    t = [targets[n][allowed[targets[n]]] for n in keep]
    g = torch.as_tensor(np.maximum(global_logp[keep], _FLOOR), dtype=torch.float64)
    feats = _features(histories.subset(keep), similarity, cfg.tau_days, n_items)
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
        return LocalLayer(PRIOR.copy(), np.zeros(n_items), pop, similarity, cfg.tau_days, n, {"prior": start})
    return LocalLayer(w, bias, pop, similarity, cfg.tau_days, n, {"prior": start, "fitted": end})


def adapt(global_model, data: StoreData, cfg: LocalConfig = LocalConfig()) -> LocalLayer:
    """The store's local layer on top of ``global_model`` (a :class:`Recommender`).

    Fitted on the store's training period (:func:`validation_split`), then set up to serve
    from the whole pre-cut history. Reads the model's scores; the model is not changed.
    """
    from common.evaluation.evaluation import scores

    ex, hist, targets, everyone = validation_split(data, cfg.valid_days)
    if len(ex):
        similarity = item_similarity(everyone, data.items.n_items) if "item_knn" in cfg.features else None
        layer = fit(scores(global_model, ex), hist, targets, data.store_counts, data.assortment, similarity, cfg)
    else:
        layer = LocalLayer(PRIOR.copy(), np.zeros(data.items.n_items), store_pop_feature(data.store_counts),
                           None, cfg.tau_days)
    if "item_knn" in cfg.features:
        layer.similarity = serving_similarity(data)
    return layer
