"""Models the serving tests share."""

from __future__ import annotations

import torch

from common.learning.model import ModelConfig, Recommender


def mixture_model(data) -> Recommender:
    """A small model of ``data``'s catalog with a non-trivial gate and repeat head, so both
    parts of the mixture count in its scores (seeded: the same weights every call)."""
    torch.manual_seed(5)
    m = Recommender(data.items, ModelConfig(dim=16, hidden=32))
    with torch.no_grad():
        m.gate.weight.normal_(0, 0.3)
        m.gate.bias.fill_(0.4)
        m.repeat_mix.weight.normal_(0, 0.5)
        m.item_out.bias.normal_(0, 0.5)
        # A non-zero explore prior (DESIGN §5.3), so its item and category terms count too.
        m.prior_item.normal_(0, 1.0)
        m.prior_cat.normal_(0, 1.0)
    m.refresh_item_snapshot()
    return m
