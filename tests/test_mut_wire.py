"""common.exchange.wire: the exact texts a declining or refusing store sends, and the
parsers the server reads them with (kills the mutants the reply tests leave alive)."""

from __future__ import annotations

import json

import pytest

from common.exchange import wire


def test_the_allowlists_are_exactly_the_designed_ones():
    assert wire.TRAIN_METRICS == ("num-examples", "epsilon", "delta", "noise-multiplier", "rounds-trained",
                                  "epsilon-budget", "train-loss")
    assert wire.TRAIN_CONFIG == ("store-id", "accountant")
    assert wire.MODEL_ACK_CONFIG == ("store-id", "model-hash")
    assert wire.EVAL_CONFIG == ("store-id",)
    assert wire.DECLINE_KEYS == ("store-id", "epsilon", "epsilon-after", "epsilon-budget", "delta", "accountant",
                                 "reason")
    assert wire.REFUSE_KEYS == ("store-id", "reason")
    assert (wire.DECLINE_CODE, wire.REFUSE_CODE, wire.REFUSE_REASON_MAX) == (1001, 1002, 600)


def test_a_decline_is_the_prefix_and_sorted_json_of_allowed_keys_only():
    info = {"store-id": "S001", "epsilon": 7.5, "reason": "budget"}
    assert wire.decline_reason(info) == 'storefed-decline {"epsilon": 7.5, "reason": "budget", "store-id": "S001"}'
    assert wire.decline_reason({}) == "storefed-decline {}"
    with pytest.raises(ValueError) as err:
        wire.decline_reason({"store-id": "S001", "members": 3, "ages": [1]})
    assert str(err.value) == "not allowed in a decline: ['ages', 'members']"


def test_a_refusal_collapses_whitespace_and_caps_its_reason_at_600_characters():
    assert wire.refuse_reason(7, "no\n  file\tthere ") == 'storefed-refuse {"reason": "no file there", "store-id": "7"}'
    exact = "x" * 600
    assert json.loads(wire.refuse_reason("S", exact)[len("storefed-refuse "):])["reason"] == exact
    long = "y" * 601
    capped = json.loads(wire.refuse_reason("S", long)[len("storefed-refuse "):])["reason"]
    assert capped == "y" * 599 + "…" and len(capped) == 600


def test_the_parsers_read_their_own_kind_only():
    refusal = wire.refuse_reason("S002", "missing column")
    decline = wire.decline_reason({"store-id": "S002", "epsilon": 1.0})
    assert wire.parse_refusal(refusal) == {"store-id": "S002", "reason": "missing column"}
    assert wire.parse_decline(decline) == {"store-id": "S002", "epsilon": 1.0}
    assert wire.parse_refusal(decline) is None and wire.parse_decline(refusal) is None
    assert wire.parse_refusal(None) is None and wire.parse_refusal("") is None
    assert wire.parse_refusal("storefed-refuse {not json") is None
    assert wire.parse_refusal('storefed-refuse ["a list"]') is None
    assert wire.parse_decline("storefed-decline {}") == {}
    assert wire.parse_decline('x storefed-decline {"a": 1}') is None  # the prefix starts the reason
