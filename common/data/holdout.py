"""Validation splits cut from a store's training period (never its test period). Pure.

A model's settings (learning rate, epochs, a baseline's parameters) are chosen on the last
``valid_days`` of the training period: train on what came before, judge on each member's
first basket after that cut, exactly as the test split does at the real cut.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.data.dataset import Examples, MemberLog, StoreData, history_arrays

VALID_DAYS = 28


def receipts_before(log: MemberLog, day: float) -> np.ndarray:
    """How many of each member's receipts (time-ordered) fall before ``day``."""
    starts, n = log.receipt_ptr[:-1], log.n_receipts()
    return np.array([int(np.searchsorted(log.receipt_day[s:s + k], day)) for s, k in zip(starts, n)], dtype=np.int64)


def truncated(data: StoreData, day: float) -> StoreData:
    """The store's training members and receipts before ``day`` (members with none are dropped).

    Only ``train_log``, ``member_ids`` and ``profile`` change: what training reads.
    """
    log = data.train_log
    before = receipts_before(log, day)
    keep = np.flatnonzero(before > 0)
    receipts = np.concatenate([np.arange(log.receipt_ptr[m], log.receipt_ptr[m] + before[m]) for m in keep]
                              or [np.empty(0, np.int64)]).astype(np.int64)
    lines = np.concatenate([np.arange(log.line_ptr[r], log.line_ptr[r + 1]) for r in receipts]
                           or [np.empty(0, np.int64)]).astype(np.int64)
    new_log = MemberLog(
        receipt_ptr=np.concatenate([[0], np.cumsum(before[keep])]).astype(np.int64),
        receipt_day=log.receipt_day[receipts],
        line_ptr=np.concatenate([[0], np.cumsum(log.line_ptr[receipts + 1] - log.line_ptr[receipts])]).astype(np.int64),
        line_item=log.line_item[lines],
        line_qty=log.line_qty[lines],
    )
    return dataclasses.replace(data, train_log=new_log, member_ids=data.member_ids[keep], profile=data.profile[keep])


@dataclasses.dataclass
class ValidSplit:
    """One store's validation split: members with a receipt in the validation period."""

    members: np.ndarray  # rows of the store's train_log
    upto: np.ndarray  # receipts before the validation cut, for every training member
    examples: Examples  # the members' model inputs at the validation cut
    targets: list[np.ndarray]  # their first basket after the cut
    day: float  # the validation cut


def validation_split(data: StoreData, valid_days: int = VALID_DAYS) -> ValidSplit:
    """Histories up to ``cut − valid_days`` → each member's first basket after it (before the cut)."""
    log = data.train_log
    day = data.cut_day - valid_days
    upto = receipts_before(log, day)
    members = np.flatnonzero(upto < log.n_receipts())
    items, feat, mask = (a[members] for a in history_arrays(log, upto, np.full(len(upto), day), data.example_cfg))
    first = log.receipt_ptr[:-1][members] + upto[members]
    targets = [np.unique(log.line_item[log.line_ptr[r]:log.line_ptr[r + 1]]) for r in first]
    no_target = np.zeros((len(members), 1), np.int64)
    ex = Examples(items, feat, mask, data.profile[members], no_target, np.zeros((len(members), 1), np.float32))
    return ValidSplit(members, upto, ex, targets, float(day))
