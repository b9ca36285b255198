"""server.strategy's bookkeeping and guards, with hand-computed aggregates: a rejected update is
left out, the min-stores skip, declines and refusals, the round's log lines, the metrics kept
(kills the mutants tests/test_aggregation.py and tests/test_round_log.py leave alive)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.exchange import wire
from server import strategy as S


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _asked(nodes):
    out = []
    for node in nodes:
        msg = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                      message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = f"m{node}"
        out.append(msg)
    return out


def _reply(sent, w, n, store, eps=1.0, loss=None, dtype=np.float32):
    metrics = {"num-examples": n, "epsilon": eps, "delta": 1e-6, "noise-multiplier": 1.5, "rounds-trained": 2,
               "epsilon-budget": 8.0}
    if loss is not None:
        metrics["train-loss"] = loss
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(w, dtype=dtype))}),
                          "metrics": MetricRecord(metrics),
                          "store": ConfigRecord({"store-id": store, "accountant": "rdp"})})
    return Message(content=content, reply_to=sent)


def _strategy(lines, name="fedavg", **kwargs):
    s = S.make_strategy(name, num_rounds=3, printer=lines.append, **kwargs)
    s._sent = {"w": np.zeros(2, np.float32)}
    return s


def test_a_rejected_update_is_left_out_of_the_weighted_mean_and_everything_is_recorded():
    lines = []
    s = _strategy(lines, norm_factor=3.0, round_offset=10)
    asked = _asked([1, 2, 3, 4])
    s._asked = asked
    replies = [_reply(asked[0], [1.0, 1.0], 100, "S1", eps=2.0, loss=0.5),
               _reply(asked[1], [3.0, 3.0], 300, "S2", eps=3.5, loss=1.0),
               _reply(asked[2], [100.0, 100.0], 50, "S3", eps=1.0)]  # 70 × the median distance
    arrays, _ = s.aggregate_train(1, replies)  # node 4 never answers
    # (100·1 + 300·3) / 400 = 2.5 in each coordinate; S3 left out
    assert arrays["w"].numpy().tolist() == [2.5, 2.5] and arrays["w"].numpy().dtype == np.float32
    assert s.latest_arrays is arrays
    entry = s.rounds[-1]
    assert {k: entry[k] for k in ("round", "participated", "declined", "failed", "rejected", "max_epsilon")} == {
        "round": 11, "participated": 3, "declined": 0, "failed": 1, "rejected": 1, "max_epsilon": 3.5}
    assert entry["train_loss"] == pytest.approx((0.5 * 100 + 1.0 * 300) / 400)
    assert "_losses" not in entry
    assert entry["bytes_received"] == sum(S.reply_bytes(_reply(a, w, n, st, e, l)) for a, w, n, st, e, l in [
        (asked[0], [1.0, 1.0], 100, "S1", 2.0, 0.5), (asked[1], [3.0, 3.0], 300, "S2", 3.5, 1.0),
        (asked[2], [100.0, 100.0], 50, "S3", 1.0, None)])
    assert s.privacy["S2"] == {"declined_rounds": 0, "epsilon": 3.5, "delta": 1e-6, "noise_multiplier": 1.5,
                               "rounds_trained": 2, "budget": 8.0, "accountant": "rdp", "members": 300}
    assert s.stores_by_node == {1: "S1", 2: "S2", 3: "S3"}
    rejected = [f for f in s.failures if f["phase"] == "validation"]
    assert rejected == [{"round": 11, "node": 3, "store": "S3", "phase": "validation",
                         "reason": "rejected: update moves the model by 141.4, over 3 × the round's median 4.243"}]
    assert s.failures[0] == {"round": 11, "node": 4, "store": "node-4", "phase": "train",
                              "reason": "no reply within the round timeout (round-timeout-s)"}
    assert "  store node-4 failed in round 11: no reply within the round timeout" in lines
    assert "  round 11: trained S1, S2, S3 · failed node-4" in lines
    assert ("  update of store S3 rejected in round 11: update moves the model by 141.4, over 3 × the round's "
            "median 4.243") in lines
    # each reply was cut down to what aggregation needs
    assert set(replies[0].content.keys()) == {"arrays", "metrics"}
    assert dict(replies[0].content["metrics"]) == {"num-examples": 100}


def test_too_few_acceptable_updates_skip_the_round_and_keep_the_model():
    lines = []
    s = _strategy(lines, min_stores=2)
    asked = _asked([1, 2])
    s._asked = asked
    bad = _reply(asked[1], [np.nan, 0.0], 10, "S2")
    assert s.aggregate_train(2, [_reply(asked[0], [1.0, 1.0], 10, "S1"), bad]) == (None, None)
    assert s.rounds[-1]["skipped"] is True and s.rounds[-1]["rejected"] == 1 and s.latest_arrays is None
    assert ("  round 2 skipped: 1 acceptable updates, 2 needed; the global model stays as it was") in lines
    # exactly min_stores acceptable updates: aggregated
    s2 = _strategy([], min_stores=2)
    s2._asked = asked = _asked([1, 2])
    arrays, _ = s2.aggregate_train(1, [_reply(asked[0], [1.0, 1.0], 10, "S1"), _reply(asked[1], [3.0, 3.0], 30, "S2")])
    assert arrays["w"].numpy().tolist() == [2.5, 2.5] and "skipped" not in s2.rounds[-1]


def test_declines_refusals_and_failures_are_counted_and_named():
    lines = []
    s = _strategy(lines)
    asked = _asked([1, 2, 3, 4])
    s._asked = asked
    s.privacy["S2"] = {"rounds_trained": 4, "noise_multiplier": 2.0, "declined_rounds": 1, "members": 7}
    decline = wire.decline_reason({"store-id": "S2", "epsilon": 7.9, "epsilon-after": 8.4, "epsilon-budget": 8.0,
                                   "delta": 1e-7, "accountant": "prv", "reason": "over budget"})
    replies = [_reply(asked[0], [2.0, 2.0], 10, "S1"),
               Message(Error(code=wire.DECLINE_CODE, reason=decline), reply_to=asked[1]),
               Message(Error(code=wire.REFUSE_CODE, reason=wire.refuse_reason("S3", "no data")), reply_to=asked[2]),
               Message(Error(code=7, reason="Traceback\n  line\n\x1b[31mValueError: boom\x1b[0m\n"), reply_to=asked[3])]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays["w"].numpy().tolist() == [2.0, 2.0]
    entry = s.rounds[-1]
    assert (entry["participated"], entry["declined"], entry["failed"]) == (1, 1, 2)
    assert s.privacy["S2"] == {"rounds_trained": 4, "noise_multiplier": 2.0, "declined_rounds": 2, "members": 7,
                               "epsilon": 7.9, "delta": 1e-7, "budget": 8.0, "accountant": "prv"}
    assert entry["max_epsilon"] == 7.9
    assert s.stores_by_node == {1: "S1", 2: "S2", 3: "S3"}
    assert [(f["store"], f["node"], f["phase"], f["reason"]) for f in s.failures] == [
        ("S3", 3, "train", "refused: no data"), ("node-4", 4, "train", "ValueError: boom")]
    assert "  store S2 declined round 1: over budget" in lines
    assert "  store S3 refused round 1 (it cannot train): no data" in lines
    assert "  store node-4 failed in round 1: ValueError: boom" in lines
    assert "  round 1: trained S1 · declined S2 · refused S3 · failed node-4" in lines
    # a decline code with a reason that is not a decline is a failure
    s3 = _strategy([])
    s3._asked = asked = _asked([5])
    s3.aggregate_train(1, [Message(Error(code=wire.DECLINE_CODE, reason="garbled"), reply_to=asked[0])])
    assert (s3.rounds[-1]["declined"], s3.rounds[-1]["failed"]) == (0, 1)
    # a first decline starts from no training
    s4 = _strategy([])
    s4._asked = asked = _asked([6])
    with pytest.raises(S.BudgetExhausted) as err:
        s4.aggregate_train(3, [Message(Error(code=wire.DECLINE_CODE, reason=decline), reply_to=asked[0])])
    assert str(err.value) == ("every store declined round 3: their privacy budgets would be exceeded; no more "
                              "training is possible at these settings")
    assert s4.privacy["S2"]["declined_rounds"] == 1 and s4.privacy["S2"]["rounds_trained"] == 0
    assert s4.privacy["S2"]["noise_multiplier"] == 0.0


def test_evaluate_records_failures_and_the_round_line():
    lines, ends = [], []
    s = _strategy(lines, on_round_end=lambda r, a: ends.append((r, a)), round_offset=1)
    s.rounds.append({"round": 2, "participated": 2, "failed": 1})
    asked = _asked([1, 2, 3])

    def ev(sent, ndcg, n):
        return Message(RecordDict({"metrics": MetricRecord({"ndcg@10": ndcg, "num-examples": n})}), reply_to=sent)

    replies = [ev(asked[0], 0.2, 10), ev(asked[1], 0.5, 30),
               Message(Error(code=wire.REFUSE_CODE, reason=wire.refuse_reason("S3", "gone")), reply_to=asked[2])]
    metrics = s.aggregate_evaluate(1, replies)
    assert metrics["ndcg@10"] == pytest.approx((0.2 * 10 + 0.5 * 30) / 40)
    entry = s.rounds[-1]
    assert entry["evaluated"] == 2 and entry["ndcg@10"] == pytest.approx(0.425)
    assert entry["metrics"]["ndcg@10"] == pytest.approx(0.425) and isinstance(entry["seconds"], float)
    assert s.failures == [{"round": 2, "node": 3, "store": "node-3", "reason": "refused: gone", "phase": "evaluate"}]
    assert ends == [(2, None)]
    assert lines[-1].startswith("[round 2/3] 2 stores trained · 1 failed · NDCG@10 0.4250 · max ε 0.00 · ")
    failed = Message(Error(code=3, reason="a\nlast words"), reply_to=asked[0])
    s.aggregate_evaluate(2, [failed])
    assert s.failures[-1]["reason"] == "last words" and s.failures[-1]["round"] == 3
    assert lines[-1].startswith("[round 3/3] 0 stores trained · NDCG@10 n/a")


def test_the_log_line_helpers_by_hand():
    assert S.last_line(None) == "no reason given" and S.last_line("\n  \n") == "no reason given"
    assert S.last_line("first\n\x1b[1;31m  the end  \x1b[0m\n\n") == "the end"
    assert S.who_did_what(4, {}) == "  round 4: no store replied"
    assert S.who_did_what(4, {"failed": ["b", "a"], "trained": ["S2", "S1"], "other": ["x"]}) == (
        "  round 4: trained S1, S2 · failed a, b")
    entry = {"round": 2, "participated": 3, "failed": 1, "declined": 2, "rejected": 1, "train_loss": 0.12345,
             "ndcg@10": 0.31234, "seconds": 4.26}
    privacy = {"a": {"epsilon": 1.234}, "b": {"epsilon": 5.678}}
    assert S.progress_line(entry, 9, privacy) == ("[round 2/9] 3 stores trained · 1 failed · 2 declined · 1 rejected"
                                                  " · loss 0.123 · NDCG@10 0.3123 · max ε 5.68 · 4.3s")
    assert S.progress_line({"round": 1}, 2, {}) == "[round 1/2] 0 stores trained · NDCG@10 n/a · max ε 0.00 · 0.0s"


def test_make_strategy_state_and_restore():
    with pytest.raises(ValueError) as err:
        S.make_strategy("fedsgd", num_rounds=1)
    assert str(err.value) == ("unknown strategy 'fedsgd'; choose one of fedavg, fedavgm, fedadam, fedyogi, fedprox, "
                              "fedmedian, fedtrimmedavg, krum, multikrum")
    s = S.make_strategy("fedavg", num_rounds=1, printer=print)
    assert type(s).__name__ == "ObservedFedAvg" and s.num_rounds == 1 and s.norm_factor == 10.0
    assert (s.min_stores, s.round_offset, s.update_encoding) == (1, 0, "float32")
    assert s.state() == {}
    s.restore({"m_t": [1.0]})
    assert s.state() == {"m_t": [1.0]} and s.state()["m_t"] is not s.m_t
    with pytest.raises(ValueError) as err:
        s.restore({"secret": 1})
    assert str(err.value) == "checkpoint holds unknown strategy state 'secret'"
    assert s.store_name(9) == "node-9"
    s.stores_by_node[9] = "S9"
    assert s.store_name(9) == "S9"


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_configure_shifts_the_round_and_keeps_what_was_sent():
    s = S.make_strategy("fedavg", num_rounds=2, printer=lambda _: None, round_offset=5)
    arrays = ArrayRecord({"w": Array(np.array([1.5, -2.0], np.float32))})
    asked = list(s.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), _Grid([4, 7])))
    assert sorted(m.metadata.dst_node_id for m in asked) == [4, 7]
    assert all(m.content["config"]["server-round"] == 6 for m in asked)
    assert s._asked == asked
    assert list(s._sent) == ["w"] and s._sent["w"].tolist() == [1.5, -2.0] and s._sent["w"].dtype == np.float32
    evaluated = list(s.configure_evaluate(2, arrays, ConfigRecord({}), _Grid([4, 7])))
    assert [m.content["config"]["server-round"] for m in evaluated] == [7, 7]


def test_fallback_names_when_a_reply_omits_its_store_or_fields():
    lines = []
    s = _strategy(lines)
    asked = _asked([1, 2, 3])
    s._asked = asked
    s.privacy["S2"] = {"rounds_trained": 4}  # an entry without declined_rounds
    bare = _reply(asked[0], [1.0, 1.0], 10, "ignored")
    bare.content["store"] = ConfigRecord({"other": "x"})  # neither store-id nor accountant
    decline = "storefed-decline " + '{"store-id": "S2", "epsilon": 2.0, "epsilon-budget": 8.0, "delta": 1e-6, ' \
                                    '"accountant": "prv"}'  # no reason given
    refusal = 'storefed-refuse {"reason": "no data"}'  # no store-id
    s.aggregate_train(1, [bare, Message(Error(code=wire.DECLINE_CODE, reason=decline), reply_to=asked[1]),
                          Message(Error(code=wire.REFUSE_CODE, reason=refusal), reply_to=asked[2])])
    assert s.privacy["node-1"]["accountant"] == "" and s.stores_by_node[1] == "node-1"
    assert s.privacy["S2"]["declined_rounds"] == 1 and s.privacy["S2"]["rounds_trained"] == 4
    assert "  store S2 declined round 1: " in lines
    assert "  store node-3 refused round 1 (it cannot train): no data" in lines
    assert s.failures[0]["store"] == "node-3"
