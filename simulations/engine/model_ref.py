"""The round's global model, sent once per round to a simulation's workers instead of once per store.

Flower's Ray backend pickles each store's message, the 645 KB model included, on the
driver (under the GIL it shares with the ServerApp) and copies it to a worker, once per
store task. Here the backend puts each distinct set of global arrays into Ray's object
store once (:class:`Outbox`), and a store task's message carries only
``wire.MODEL_REF`` = {"sha256": digest} in place of ``wire.TRAIN_ARRAYS``, with the
object's reference passed next to the message. The worker (:class:`Inbox`) fetches each
digest once, checks the arrays against it, keeps them, and gives the ClientApp the
message as Flower built it. Ray's object store rather than a file: an attached Ray
cluster may run workers on other machines, and nothing is written to disk.

Simulation only: a deployed store's ClientApp never resolves a reference (it refuses a
message that carries one, see client.client_app); the resolution lives here, in the
simulation's glue, in the worker before the ClientApp is called.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common.exchange import wire

KEEP = 4  # distinct global models kept per side (a round has one; evaluation may follow training)


class ModelRefError(RuntimeError):
    """The arrays a simulation worker fetched are not the ones the message names."""


def arrays_digest(record: ArrayRecord) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in the record's order."""
    h = hashlib.sha256()
    for name, array in record.items():
        h.update(f"{name}\0{array.dtype}\0{tuple(array.shape)}\0{array.stype}\0{len(array.data)}\0".encode())
        h.update(array.data)
    return h.hexdigest()


def _with_content(message: Message, content: RecordDict) -> Message:
    """A shallow copy of ``message`` (same metadata) with ``content`` in place of its own."""
    twin = copy.copy(message)
    twin.__dict__["_content"] = content
    return twin


def _swap(content: RecordDict, old: str, new: str, record: Any) -> RecordDict:
    """``content`` with the record ``old`` replaced by ``record`` under ``new``, in place of it."""
    return RecordDict({(new if name == old else name): (record if name == old else value)
                       for name, value in content.items()})


class Outbox:
    """Driver side: one ``ray.put`` per distinct global model; light messages per store."""

    def __init__(self, put: Callable[[Any], Any] | None = None) -> None:
        self.put = put  # default: ray.put
        self.puts = 0  # distinct global models put so far
        # identity of the arrays' byte buffers -> (digest, ObjectRef, the buffers, kept alive
        # so that their ids are not reused while they key this table)
        self._sent: dict[tuple[int, ...], tuple[str, Any, list[bytes]]] = {}
        self._refs: dict[str, Any] = {}  # digest -> ObjectRef

    def light(self, message: Message) -> tuple[Message, list[Any]]:
        """``message`` with its global arrays replaced by a reference, and the reference's
        object in a list (a nested reference: Ray hands it over unresolved). Messages
        without arrays (or with an error) go as they are, with an empty list."""
        if not message.has_content() or wire.TRAIN_ARRAYS not in message.content:
            return message, []
        content = message.content
        record = content[wire.TRAIN_ARRAYS]
        if not isinstance(record, ArrayRecord):
            return message, []
        buffers = [array.data for array in record.values()]
        key = tuple(id(b) for b in buffers)
        sent = self._sent.get(key)
        if sent is None:
            # The strategy gives every store of a round the same ArrayRecord, so this runs
            # once per round; a copy of arrays already put (the final delivery builds one per
            # store) is hashed and goes by the reference already made.
            digest = arrays_digest(record)
            ref = self._refs.get(digest)
            if ref is None:
                if self.put is None:
                    import ray

                    self.put = ray.put
                ref = self._refs[digest] = self.put(record)
                self.puts += 1
            sent = self._sent[key] = (digest, ref, buffers)
            for table in (self._sent, self._refs):
                while len(table) > KEEP:
                    table.pop(next(iter(table)))
        ref = ConfigRecord({"sha256": sent[0]})
        return _with_content(message, _swap(content, wire.TRAIN_ARRAYS, wire.MODEL_REF, ref)), [sent[1]]


class Inbox:
    """Worker side: each referenced model fetched once, checked against its digest, kept."""

    def __init__(self, get: Callable[[Any], Any] | None = None) -> None:
        self.get = get  # default: ray.get
        self._arrays: dict[str, ArrayRecord] = {}

    def resolve(self, message: Message, refs: list[Any]) -> Message:
        """``message`` as the strategy built it: its reference replaced by the arrays.

        Raises :class:`ModelRefError` when the message names a model it does not bring,
        or the fetched arrays' digest is not the one named."""
        if not message.has_content() or wire.MODEL_REF not in message.content:
            return message
        content = message.content
        digest = str(content[wire.MODEL_REF].get("sha256", ""))
        record = self._arrays.get(digest)
        if record is None:
            if len(refs) != 1:
                raise ModelRefError("a simulated store's message names a global model but brings no reference to it")
            if self.get is None:
                import ray

                self.get = ray.get
            record = self.get(refs[0])
            got = arrays_digest(record) if isinstance(record, ArrayRecord) else "not an ArrayRecord"
            if got != digest:
                raise ModelRefError(f"the global model fetched for a simulated store has sha256 {got}, "
                                    f"not the {digest} its message names")
            self._arrays[digest] = record
            while len(self._arrays) > KEEP:
                self._arrays.pop(next(iter(self._arrays)))
        return _with_content(message, _swap(content, wire.MODEL_REF, wire.TRAIN_ARRAYS, record))
