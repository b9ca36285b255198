"""The simulation poller fix: same deliveries as Flower's loop, without scanning idle nodes."""

from __future__ import annotations

import threading
from queue import Queue
from types import SimpleNamespace

from simulations import flower_patches


class _State:
    """The parts of Flower's in-memory link state the poller touches."""

    def __init__(self, messages):
        self.lock = threading.RLock()
        self.message_ins_store = {i: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, delivered_at=d))
                                  for i, (n, d) in enumerate(messages)}
        self.asked: list[int] = []

    def get_message_ins(self, node_id, limit):
        self.asked.append(node_id)
        for m in self.message_ins_store.values():
            if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == "":
                m.metadata.delivered_at = "now"
                return [m]
        return []


def _poll(state, nodes, ticks=3):
    queue, stop = Queue(), threading.Event()
    worker = threading.Thread(target=flower_patches.add_messages_to_queue, args=(state, queue, nodes, stop))
    worker.start()
    stop.wait(0.1 * ticks + 0.05)
    stop.set()
    worker.join()
    return [queue.get().metadata.dst_node_id for _ in range(queue.qsize())]


def test_every_waiting_message_is_delivered_once_and_idle_nodes_are_not_scanned():
    state = _State([(1, ""), (3, ""), (2, "earlier"), (3, "")])
    delivered = _poll(state, {1: 0, 2: 1, 3: 2, 4: 3})
    assert sorted(delivered) == [1, 3, 3]  # node 3's second message on a later tick, as in Flower
    assert 2 not in state.asked and 4 not in state.asked


def test_an_unknown_link_state_falls_back_to_flowers_loop(monkeypatch):
    calls = []
    monkeypatch.setitem(flower_patches._ORIGINAL, "add_messages_to_queue", lambda *a: calls.append(a))
    flower_patches.add_messages_to_queue(object(), Queue(), {1: 0}, threading.Event())
    assert len(calls) == 1
