"""Scores for serving at the store (DESIGN §5, §5.2): member → items, item → members. Pure numpy.

The same mixture as :meth:`common.learning.model.Recommender.forward`, taken apart so that a
store can precompute what does not change between requests:

* item side, once per model: ``V = O + C[category] + B[brand]`` and the bias ``b`` (the
  trained bias plus the explore prior's ``prior_item``);
* member side, once per member (and again after one of their receipts): the member vector
  ``u``, the catalog's log-normaliser ``logZ = logsumexp(V u + b)``, the repeat gate ``π``
  and the repeat probabilities ``p_repeat`` over their own history items, and the explore
  prior's category term ``a_m[c] = log Σ_c' h_m(c')·exp(prior_cat[c', c])`` (DESIGN §5.3).

``score(m, i) = log((1 − π_m) · exp(v_i · u_m + b_i + a_m[cat(i)] − logZ_m) + π_m · p_repeat_m(i))`` is the
model's log-probability of item i in member m's next basket, so scores compare across members
(audience). An item the store lists but has never sold is scored by its category and brand
vectors alone (``C[category] + B[brand]``, the catalog's mean bias): its item-ID row learned
nothing but "nobody bought this".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.learning.model import PRIOR_LIMIT

REASONS = ("buy_again", "new_for_you", "popular_here", "new_here")


@dataclass
class ItemSide:
    """The model's item side and member encoder as numpy arrays (float64 for stable sums)."""

    V: np.ndarray  # [n_items, d] item vectors (history encoder snapshot and output layer)
    b: np.ndarray  # [n_items] the trained bias plus prior_item
    prior_item: np.ndarray  # [n_items] the explore prior's item term (clamped), part of b
    exp_prior_cat: np.ndarray  # [C, C] exp(prior_cat), clamped
    category: np.ndarray  # [n_items] each item's category
    cat_brand: np.ndarray  # [n_items, d] C[category] + B[brand]
    enc_in_w: np.ndarray
    enc_in_b: np.ndarray
    enc_out_w: np.ndarray
    enc_out_b: np.ndarray
    gate_w: np.ndarray
    gate_b: float
    rep_w: np.ndarray
    rep_b: float
    rep_hidden_w: np.ndarray
    rep_hidden_b: np.ndarray
    rep_mix_w: np.ndarray


def item_side(weights: dict, category: np.ndarray, brand: np.ndarray) -> ItemSide:
    """From a Recommender's state dict (name → array) and the catalog's category/brand indices."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    cat_brand = w["cat_out.weight"][category] + w["brand_out.weight"][brand]
    n_cat = w["cat_out.weight"].shape[0]
    # A model from before the explore prior has none: its terms are then 0, as in the model.
    prior_item = np.clip(w.get("prior_item", np.zeros(len(category))), -PRIOR_LIMIT, PRIOR_LIMIT)
    prior_cat = np.clip(w.get("prior_cat", np.zeros((n_cat, n_cat))), -PRIOR_LIMIT, PRIOR_LIMIT)
    return ItemSide(
        V=w["item_out.weight"] + cat_brand, b=w["item_out.bias"] + prior_item, prior_item=prior_item,
        exp_prior_cat=np.exp(prior_cat), category=np.asarray(category, dtype=np.int64), cat_brand=cat_brand,
        enc_in_w=w["encoder_in.weight"], enc_in_b=w["encoder_in.bias"],
        enc_out_w=w["encoder_out.weight"], enc_out_b=w["encoder_out.bias"],
        gate_w=w["gate.weight"][0], gate_b=float(w["gate.bias"][0]),
        rep_w=w["repeat.weight"][0], rep_b=float(w["repeat.bias"][0]),
        rep_hidden_w=w["repeat_hidden.weight"], rep_hidden_b=w["repeat_hidden.bias"],
        rep_mix_w=w["repeat_mix.weight"][0],
    )


@dataclass
class MemberState:
    """What a member's scores need, for a batch of M members."""

    u: np.ndarray  # [M, d]
    log_z: np.ndarray  # [M]
    gate: np.ndarray  # [M] π (0 without history)
    rep_items: np.ndarray  # [M, H] history items
    rep_prob: np.ndarray  # [M, H] π-free repeat probabilities (0 where no item)
    aff: np.ndarray  # [M, C] the explore prior's category term per category (0: no prior or no history)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def encode_members(side: ItemSide, hist_items: np.ndarray, hist_feat: np.ndarray, hist_mask: np.ndarray,
                   profile: np.ndarray) -> MemberState:
    """Member states from history features ``[M, H]``/``[M, H, F]`` and profiles ``[M, P]``."""
    feat = hist_feat.astype(np.float64)
    mask = hist_mask.astype(np.float64)
    weight = feat[..., 0] * mask
    total = weight.sum(axis=1, keepdims=True)
    weight = weight / np.maximum(total, 1e-6)
    hist_vec = np.einsum("mh,mhd->md", weight, side.V[hist_items])
    share = np.zeros((len(hist_items), side.exp_prior_cat.shape[0]))
    np.add.at(share, (np.repeat(np.arange(len(hist_items)), hist_items.shape[1]), side.category[hist_items].ravel()),
              weight.ravel())
    aff = np.where(total > 0, np.log(np.maximum(share @ side.exp_prior_cat, 1e-30)), 0.0)
    x = np.concatenate([hist_vec, profile.astype(np.float64), (total > 0).astype(np.float64)], axis=1)
    hidden = _relu(x @ side.enc_in_w.T + side.enc_in_b)
    u = hist_vec + hidden @ side.enc_out_w.T + side.enc_out_b
    logits = u @ side.V.T + side.b + aff[:, side.category]
    top = logits.max(axis=1, keepdims=True)
    log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
    has_hist = mask.sum(axis=1) > 0
    gate = 1.0 / (1.0 + np.exp(-(hidden @ side.gate_w + side.gate_b))) * has_hist
    rep = feat @ side.rep_w + side.rep_b + _relu(feat @ side.rep_hidden_w.T + side.rep_hidden_b) @ side.rep_mix_w
    rep = np.where(mask > 0, rep, -np.inf)
    rep_max = np.where(has_hist, rep.max(axis=1), 0.0)[:, None]
    ex = np.where(mask > 0, np.exp(rep - rep_max), 0.0)
    rep_prob = ex / np.maximum(ex.sum(axis=1, keepdims=True), 1e-300)
    return MemberState(u, log_z, gate, hist_items.astype(np.int64), rep_prob, aff)


def scores_for_member(state: MemberState, m: int, cand_v: np.ndarray, cand_b: np.ndarray, cand_cat: np.ndarray,
                      cand_pos: np.ndarray) -> np.ndarray:
    """Log-probability of every candidate item for member row ``m``.

    ``cand_v``/``cand_b``/``cand_cat``: the candidates' vectors, biases and categories;
    ``cand_pos[item]``: the item's position among the candidates, −1 when it is not one.
    """
    prob = (1.0 - state.gate[m]) * np.exp(cand_v @ state.u[m] + cand_b + state.aff[m][cand_cat] - state.log_z[m])
    if state.gate[m] > 0:
        pos = cand_pos[state.rep_items[m]]
        ok = (pos >= 0) & (state.rep_prob[m] > 0)
        np.add.at(prob, pos[ok], state.gate[m] * state.rep_prob[m][ok])
    return np.log(np.maximum(prob, 1e-30))


def scores_for_members(state: MemberState, rows: np.ndarray, item_v: np.ndarray, item_b: np.ndarray,
                       item_cat: np.ndarray) -> np.ndarray:
    """Log-probability of every item (vectors ``item_v`` [I, d], biases ``item_b`` [I],
    categories ``item_cat`` [I]) for the member rows ``rows``, [len(rows), I]:
    :func:`scores_for_member` for a batch, over all items (the store-local layer re-scores
    whole rows)."""
    gate = state.gate[rows][:, None]
    prob = (1.0 - gate) * np.exp(state.u[rows] @ item_v.T + item_b + state.aff[rows][:, item_cat]
                                 - state.log_z[rows][:, None])
    rep = gate * state.rep_prob[rows]
    r, h = np.nonzero(rep > 0)
    np.add.at(prob, (r, state.rep_items[rows][r, h]), rep[r, h])
    return np.log(np.maximum(prob, 1e-30))


def scores_for_item(state: MemberState, v: np.ndarray, b: float, category: int, item: int) -> np.ndarray:
    """Log-probability of ``item`` (vector ``v``, bias ``b``, ``category``) for every member row, [M]."""
    prob = (1.0 - state.gate) * np.exp(state.u @ v + b + state.aff[:, category] - state.log_z)
    hit = state.rep_items == item
    prob += state.gate * (state.rep_prob * hit).sum(axis=1)
    return np.log(np.maximum(prob, 1e-30))


DISCOVERY_SHARE = 0.1  # of a list's places kept for items new to the store (DESIGN §5.2)


def discovery_slots(k: int) -> int:
    """Places of a ``k``-list kept for items new to the store: one in ten, rounded down
    (a list shorter than 10 keeps none)."""
    return int(max(int(k), 0) * DISCOVERY_SHARE)


def with_discovery(scores: np.ndarray, k: int, new: np.ndarray) -> np.ndarray:
    """A ``k``-list with its last :func:`discovery_slots` places kept for ``new`` items.

    Repeat purchases fill a grocery list, so an item the store has never sold would never
    reach it by score alone; the list takes the best ``k - s`` of the others, then the best
    ``s`` of ``new`` (``new``: bool mask over ``scores``). Too few of either: the other fills in.
    """
    scores = np.asarray(scores, dtype=np.float64)
    new = np.asarray(new, dtype=bool)
    k = min(int(k), len(scores))
    slots = min(discovery_slots(k), int(new.sum()))
    if slots == 0:
        return top_k(scores, k)
    usual = np.flatnonzero(~new)
    main = usual[top_k(scores[usual], k - slots)]
    fresh = np.flatnonzero(new)
    found = fresh[top_k(scores[fresh], slots)]
    picked = np.concatenate([main, found])
    if len(picked) < k:  # fewer usual items than k - s: the best remaining new ones fill the list
        rest = np.setdiff1d(fresh, found)
        extra = rest[top_k(scores[rest], k - len(picked))]
        picked = np.concatenate([picked, extra])
    return picked.astype(np.int64)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores, best first (ties: lower index first)."""
    k = min(int(k), len(scores))
    if k <= 0:
        return np.empty(0, np.int64)
    scores = np.where(np.isnan(scores), -np.inf, scores)  # a NaN ranks last, never drops items
    if k < len(scores):
        # The k-th best score; of the items tied at it, the lower indices make the cut
        # (argpartition alone would pick among them arbitrarily).
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        above = np.flatnonzero(scores > kth)
        part = np.concatenate([above, np.flatnonzero(scores == kth)[:k - len(above)]])
    else:
        part = np.arange(len(scores))
    order = np.lexsort((part, -scores[part]))
    return part[order]


def reason_for(item: int, bought: set, personal: bool, new_here: bool = False) -> str:
    """Why an item is on a member's list: they bought it, the model found it, it sells
    here, or it is new to the store (stocked, never sold here: a discovery place)."""
    if not personal:
        return "popular_here"
    if new_here:
        return "new_here"
    return "buy_again" if item in bought else "new_for_you"
