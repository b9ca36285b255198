"""The shared recommender (DESIGN §5): member tower over history + profile, one item table.

score(member, item) = u · v_item + b_item + repeat(member, item)

* ``v_item = O[item] + C[category(item)] + B[brand(item)]``: item-ID, category and brand
  vectors (``item_out``, ``cat_out``, ``brand_out``, standard ``nn.Linear`` layers).
* ``u`` encodes the member: the weighted mean of the item vectors of their history plus
  their profile (age band, gender, tier, tenure), through a small MLP with a residual.
  No member-ID embedding exists anywhere.
* ``repeat`` scores the member's own history items from their purchase features (how much,
  how often, how recently): "buy again" as a learned term.
* An **explore prior** (DESIGN §5.3), two arrays the server sets and no store trains:
  ``prior_item`` (a log-popularity per item) and ``prior_cat`` (``log P(category c' | c)``),
  both from the chain's one DP release of item popularity and category co-occurrence
  (:mod:`server.explore_prior`). The explore logit of item i for member m adds
  ``prior_item[i] + log Σ_c h_m(c)·exp(prior_cat[c, cat(i)])``, with ``h_m`` the member's
  history share per category. At zero (the default, and every run without the release) both
  terms vanish; the trained vectors learn what the prior leaves.

Tied item vectors, DP-exact: the history encoder reads a *snapshot* of the item vectors
(a buffer, refreshed by :meth:`Recommender.refresh_item_snapshot` from the global model at
the start of each round), not the trainable table itself. Gradients reach the item table
only through the output layer, so every trainable parameter lives in exactly one standard
layer and Opacus' ghost clipping computes exact per-sample norms. (Opacus refuses a tied
parameter under ghost clipping, and the per-sample-gradient path would be 34-68× slower.)
The snapshot is a function of the global model, which is public, so reading it costs no
privacy.
"""

from __future__ import annotations

import torch
from torch import nn

from common.config import ModelConfig
from common.data.dataset import HISTORY_FEATURES, PROFILE_DIM, ItemIndex

__all__ = ["BasketLoss", "ModelConfig", "PRIOR_LIMIT", "Recommender"]

# The explore prior's values are clamped to ± this when read: a log-odds of e^30 is past any
# real popularity ratio, and a hostile server's huge values then cannot overflow the softmax.
PRIOR_LIMIT = 30.0


class Recommender(nn.Module):
    """Scores every catalog item for a batch of members; see the module docstring."""

    def __init__(self, items: ItemIndex, cfg: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.n_items = items.n_items
        self.register_buffer("item_category", torch.as_tensor(items.category, dtype=torch.long), persistent=False)
        self.register_buffer("item_brand", torch.as_tensor(items.brand, dtype=torch.long), persistent=False)
        # Item side: logits = u @ O^T + b, plus category and brand terms gathered per item.
        self.item_out = nn.Linear(d, items.n_items)
        self.cat_out = nn.Linear(d, items.n_categories, bias=False)
        self.brand_out = nn.Linear(d, items.n_brands, bias=False)
        # Member side.
        self.encoder_in = nn.Linear(d + PROFILE_DIM + 1, cfg.hidden)
        self.encoder_out = nn.Linear(cfg.hidden, d)
        self.repeat = nn.Linear(HISTORY_FEATURES, 1)
        self.repeat_hidden = nn.Linear(HISTORY_FEATURES, 16)
        self.repeat_mix = nn.Linear(16, 1, bias=False)
        self.gate = nn.Linear(cfg.hidden, 1)
        self.act = nn.ReLU()
        self.register_buffer("item_snapshot", torch.zeros(items.n_items, d), persistent=False)
        # The explore prior: set by the server from the chain's DP release, never trained (persistent,
        # so it travels with the model; a store only reads it, and any value is safe for DP: it
        # enters the forward pass like the data, and every member's gradient is still clipped).
        self.register_buffer("prior_item", torch.zeros(items.n_items))
        self.register_buffer("prior_cat", torch.zeros(items.n_categories, items.n_categories))
        self._init()
        self.refresh_item_snapshot()

    def _init(self) -> None:
        for layer in (self.cat_out, self.brand_out):
            nn.init.normal_(layer.weight, std=0.1)
        # The item-ID vectors start at 0: an item starts as its category + brand vector, which
        # the catalog gives, so an item no member has bought yet still scores (explore), and
        # under DP an ID vector moves away from its category only where the clipped, noised
        # signal carries it. Measured in simulations/results/dp-design/report.md (issue 24):
        # global explore NDCG@10 at ε 8 0.0585 against 0.0517 for N(0, 0.1), and also better
        # without DP (0.0834 against 0.0831).
        nn.init.zeros_(self.item_out.weight)
        nn.init.zeros_(self.item_out.bias)
        # A "buy again" prior: start by ranking a member's own items by how often they bought
        # them, as the P-TopFreq baseline does; training refines it. Not data-dependent.
        with torch.no_grad():
            self.repeat.weight.copy_(torch.tensor([[0.5, 3.0, 1.0, 1.0]]))
            self.repeat.bias.fill_(1.0)
            # Half of a basket from the member's own items to start with; training learns π.
            nn.init.zeros_(self.repeat_mix.weight)  # the non-linear correction starts at zero
            nn.init.zeros_(self.gate.weight)
            self.gate.bias.zero_()

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """Current item vectors ``v = O + C[category] + B[brand]``, [n_items, d]."""
        return (self.item_out.weight + self.cat_out.weight[self.item_category]
                + self.brand_out.weight[self.item_brand])

    @torch.no_grad()
    def refresh_item_snapshot(self) -> None:
        """Copy the current item vectors into the history encoder's read-only table."""
        self.item_snapshot.copy_(self.item_vectors())

    def _encode(self, hist_items, hist_feat, hist_mask, profile) -> tuple[torch.Tensor, torch.Tensor]:
        """(member vectors ``u`` [B, d], the encoder's hidden layer [B, hidden])."""
        weight = hist_feat[..., 0] * hist_mask
        total = weight.sum(dim=1, keepdim=True)
        weight = weight / total.clamp_min(1e-6)
        hist_vec = torch.einsum("bh,bhd->bd", weight, self.item_snapshot[hist_items])
        has_hist = (total > 0).float()
        x = torch.cat([hist_vec, profile, has_hist], dim=1)
        hidden = self.act(self.encoder_in(x))
        return hist_vec + self.encoder_out(hidden), hidden

    def category_affinity(self, hist_items, hist_feat, hist_mask) -> torch.Tensor:
        """The prior's member term ``log Σ_c h_m(c)·exp(prior_cat[c, ·])``, [B, n_categories];
        0 for a member without history (and everywhere while ``prior_cat`` is 0)."""
        weight = hist_feat[..., 0] * hist_mask
        total = weight.sum(dim=1, keepdim=True)
        share = torch.zeros(len(hist_items), self.prior_cat.shape[0], dtype=weight.dtype, device=weight.device)
        share = share.scatter_add(1, self.item_category[hist_items], weight / total.clamp_min(1e-6))
        mixed = share @ torch.exp(self.prior_cat.clamp(-PRIOR_LIMIT, PRIOR_LIMIT))
        return torch.where(total > 0, torch.log(mixed.clamp_min(1e-30)), torch.zeros_like(mixed))

    def forward(self, hist_items, hist_feat, hist_mask, profile) -> torch.Tensor:
        """Log-probabilities of every catalog item being in the next basket, [B, n_items].

        A repeat–explore mixture: ``p(i) = π·p_repeat(i) + (1 − π)·p_explore(i)`` where
        ``p_repeat`` is a softmax over the member's own history items (from their purchase
        features), ``p_explore`` a softmax over the catalog (member vector · item vector) and
        the gate ``π`` is learned from the member's encoding. A member without history has
        ``π = 0``. The scores are normalised, so they also compare across members (audience).
        """
        u, hidden = self._encode(hist_items, hist_feat, hist_mask, profile)
        logits = (
            self.item_out(u)
            + self.cat_out(u)[:, self.item_category]
            + self.brand_out(u)[:, self.item_brand]
            + self.prior_item.clamp(-PRIOR_LIMIT, PRIOR_LIMIT)
            + self.category_affinity(hist_items, hist_feat, hist_mask)[:, self.item_category]
        )
        has_hist = hist_mask.sum(dim=1, keepdim=True) > 0
        gate = torch.sigmoid(self.gate(hidden)) * has_hist  # π, [B, 1]
        repeat = (self.repeat(hist_feat) + self.repeat_mix(self.act(self.repeat_hidden(hist_feat)))).squeeze(-1)
        repeat = repeat.masked_fill(hist_mask <= 0, float("-inf"))
        p_repeat = torch.softmax(repeat, dim=1).nan_to_num(0.0) * hist_mask  # rows without history: 0
        prob = (1.0 - gate) * torch.softmax(logits, dim=1)
        prob = prob.scatter_add(1, hist_items, gate * p_repeat)
        return torch.log(prob.clamp_min(1e-30))


class BasketLoss(nn.Module):
    """Multi-label softmax loss: mean over a basket's items of −log softmax(logits)[item].

    ``reduction`` follows torch losses ("mean", "sum", "none"), as Opacus' ghost-clipping
    wrapper requires: it switches to "none" to get one loss per member.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target_items: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=1).gather(1, target_items)
        per_member = -(logp * target_mask).sum(dim=1) / target_mask.sum(dim=1).clamp_min(1.0)
        if self.reduction == "none":
            return per_member
        if self.reduction == "sum":
            return per_member.sum()
        return per_member.mean()
