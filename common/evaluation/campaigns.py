"""Real campaigns as an audience test (DESIGN §6.1): which campaigns count, the three tasks'
candidates and positives, AUC and top-decile lift. Pure: numbers and arrays in, numbers out.

The protocol is issue 25's: a campaign qualifies with ≥ 8 weeks of data before its start,
≥ 80 % of its window inside the data, ≥ 50 recipients and ≥ 10 redeemers (households that
redeemed one of its coupons inside its window). Every score is computed from data before the
start (the cut); positives are events in the window, start to end inclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date

import numpy as np

from common.evaluation.audience import roc_auc

MIN_HISTORY_DAYS = 56
MIN_WINDOW_SHARE = 0.8
MIN_RECIPIENTS = 50
MIN_REDEEMERS = 10
TASKS = ("rec_red", "rec_buy", "all_buy")
# ALL·BUY's candidates: households with a basket in this many days before the start (plus recipients).
ACTIVE_DAYS = 56
LIFT_SHARE = 0.1


@dataclass(frozen=True)
class Campaign:
    """One campaign: its id, type (A, B, C), first and last day (inclusive)."""

    campaign_id: int
    kind: str
    start: date
    end: date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


def window_share(c: Campaign, data_last: date) -> float:
    """Share of the campaign's days that fall on or before the data's last day."""
    inside = (min(c.end, data_last) - c.start).days + 1
    return max(inside, 0) / c.days


def qualifies(c: Campaign, data_first: date, data_last: date, recipients: int, redeemers: int) -> bool:
    """Issue 25's rule: enough history before the start, window inside the data, audience size."""
    return ((c.start - data_first).days >= MIN_HISTORY_DAYS and window_share(c, data_last) >= MIN_WINDOW_SHARE
            and recipients >= MIN_RECIPIENTS and redeemers >= MIN_REDEEMERS)


def top_share_lift(scores: np.ndarray, positive: np.ndarray, share: float = LIFT_SHARE) -> float:
    """Positive rate among the best-scored ``share`` of candidates over the overall rate.

    The top holds ceil(share · n) candidates; candidates tied at its boundary share its last
    places equally (each counts by the fraction of them that fits), so the order of the input
    never matters, as with the averaged ties of the AUC. NaN without positives.
    """
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n = len(scores)
    if n == 0 or not positive.any():
        return float("nan")
    top = math.ceil(share * n)
    threshold = np.sort(scores)[::-1][top - 1]
    above = scores > threshold
    at = scores == threshold
    room = top - int(above.sum())
    found = positive[above].sum() + room * positive[at].sum() / at.sum()
    return float((found / top) / positive.mean())


def task_metrics(scores: np.ndarray, positive: np.ndarray) -> dict:
    """``{"auc", "lift10", "candidates", "positives"}`` of one ranking."""
    positive = np.asarray(positive, dtype=bool)
    return {"auc": roc_auc(scores, positive), "lift10": top_share_lift(scores, positive),
            "candidates": int(len(positive)), "positives": int(positive.sum())}


def mean_metrics(rows: list[dict]) -> dict:
    """Mean AUC and lift over campaigns (NaN entries, e.g. no positives, left out)."""
    out = {}
    for key in ("auc", "lift10"):
        vals = [r[key] for r in rows if r.get(key) is not None and not np.isnan(r[key])]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    out["campaigns"] = sum(1 for r in rows if r.get("auc") is not None and not np.isnan(r["auc"]))
    return out


def purchase_rate_change(bought_before: np.ndarray, bought_during: np.ndarray, recipient: np.ndarray) -> dict:
    """Side diagnostic (no untreated control): share buying in the window minus the window
    before, for recipients and for the other candidates, and the difference of the two."""
    before = np.asarray(bought_before, dtype=bool)
    during = np.asarray(bought_during, dtype=bool)
    rec = np.asarray(recipient, dtype=bool)

    def change(mask: np.ndarray) -> float:
        return float(during[mask].mean() - before[mask].mean()) if mask.any() else float("nan")

    r, o = change(rec), change(~rec)
    return {"recipients": r, "others": o, "difference": r - o}
