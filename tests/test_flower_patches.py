"""The simulation poller fix: same deliveries as Flower's loop, without scanning idle nodes."""

from __future__ import annotations

import threading
from queue import Queue
from types import SimpleNamespace

from simulations.engine import flower_patches


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
    monkeypatch.setitem(flower_patches._ORIGINAL, "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue",
                        lambda *a: calls.append(a))
    flower_patches.add_messages_to_queue(object(), Queue(), {1: 0}, threading.Event())
    assert len(calls) == 1


# --- version gate, short waits, abort, dispatch --------------------------------------------

def test_the_patched_flower_code_is_the_code_the_patches_were_written_for():
    # Fails when a Flower upgrade changes anything patched or relied on: re-read it, then
    # update PATCHED. apply() refuses to patch in that case (Flower's own code runs).
    assert flower_patches.changed() == []
    assert flower_patches.apply() is True


def test_a_changed_flower_function_turns_the_patches_off(monkeypatch):
    name = next(iter(flower_patches.PATCHED))
    monkeypatch.setitem(flower_patches.PATCHED, name, "0" * 64)
    assert flower_patches.changed() == [name]
    assert flower_patches.apply() is False


def _stops_within(target, args, stop, limit):
    import time

    thread = threading.Thread(target=target, args=args)
    thread.start()
    stop.set()
    began = time.perf_counter()
    thread.join(5)
    return not thread.is_alive() and time.perf_counter() - began < limit


def test_worker_and_injector_threads_stop_within_a_tick_not_flowers_second():
    stop = threading.Event()
    # Flower's own loops wait up to 1.0 s on an empty queue before seeing the stop event.
    assert _stops_within(flower_patches.worker, (Queue(), Queue(), {}, None, stop, None), stop, 0.5)
    stop = threading.Event()
    assert _stops_within(flower_patches.put_message_into_state, (None, Queue(), stop), stop, 0.5)


def test_a_fatal_fault_ends_the_serverapps_wait_with_its_message():
    import pytest

    from simulations.engine import backend as sim_backend

    flower_patches.apply()
    sim_backend.reset()
    try:
        sim_backend.fail("a simulation worker (Ray actor) died")
        sim_backend.fail("a later fault")  # the first one is the run's message
        with pytest.raises(flower_patches.SimulationAborted, match=r"^a simulation worker \(Ray actor\) died$"):
            flower_patches._grid_pull(object(), set())
    finally:
        sim_backend.reset()


def test_ray_errors_are_told_apart_from_a_stores_own_error():
    import ray.exceptions as rex
    from flwr.clientapp.client_app import ClientAppException

    from simulations.engine.backend import fault_message

    assert fault_message(rex.RayTaskError("run", "tb", ClientAppException("store crashed"))) is None
    assert "cannot import the app (No module named 'client')" in fault_message(
        rex.RayTaskError("run", "tb", ModuleNotFoundError("No module named 'client'")))
    assert "(Ray actor) died" in fault_message(rex.RayActorError())
    assert "low on memory" in fault_message(rex.OutOfMemoryError("node low"))


def test_stores_return_to_their_actor_when_it_has_room_else_to_the_least_busy():
    from simulations.engine import backend as sim_backend

    backend = sim_backend.SimBackend.__new__(sim_backend.SimBackend)
    backend.actors, backend.inflight, backend.home = ["a", "b"], [0, 0], {}
    backend.room = threading.Condition()
    assert sim_backend.DEPTH == 2 and backend.num_workers == 4
    assert [backend._take(p) for p in (7, 8, 9)] == [0, 1, 0]  # least busy, lowest first
    assert backend.inflight == [2, 1]
    backend._give_back(0)
    assert backend._take(8) == 1  # store 8's actor has room
    assert backend._take(9) == 0  # store 9's actor has room again
    assert backend.inflight == [2, 2] and backend.home == {7: 0, 8: 1, 9: 0}
    backend._give_back(1)
    assert backend._take(7) == 1  # its actor is full: it moves to the one with room
