"""The `gloo` transport: a standing torch.distributed (gloo) channel to each expert-group replica.

The first send to a replica opens a two-rank channel to it (experts/channel.py): this process hosts a
TCP rendezvous store, asks the actor to join with one Ray call (`open_channel`), and joins as rank 0.
From then on a send is one message over that connection (two when its payload outgrows the size the
replica has posted a receive for) and the answer one message back: no Ray task per layer. Each channel has a reader thread that completes the sends' answers in order, so the
dispatcher's deadline is all that bounds a wait: a send abandoned past its deadline is still answered
on its channel later, keeping the channel in step, and its answer goes nowhere.

A replica whose process is gone closes the connection: its sends end at once as "dead". A new actor
behind the same replica id (a restart) gets a new channel. CUDA rows travel through host memory here,
which the `ray` transport also does; device-to-device channels (NCCL) are not written yet.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
import uuid

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from moeserve.experts.batch import ExpertBatch
from moeserve.experts.channel import (
    FIRST_CAPACITY, IDLE_TIMEOUT, OK, STATUS_KINDS, close_message, connect, first_line, pack_request, reply_nbytes,
    unpack_reply,
)

from .base import Pending, ReplicaFailure, Transport

log = logging.getLogger(__name__)
CLOSE_TIMEOUT = datetime.timedelta(seconds=5)


class _GlooPending(Pending):
    def __init__(self, replica_id: str, device: torch.device):
        self.replica_id, self.device = replica_id, device
        self.done = threading.Event()
        self._value: torch.Tensor | None = None
        self._error: BaseException | None = None

    def finish(self, value: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self.done.set()

    def result(self) -> torch.Tensor:
        if self._error is not None:
            raise self._error
        return self._value.to(self.device, non_blocking=True) if self.device.type != "cpu" else self._value


def _failed(replica_id: str, device: torch.device, detail: str, kind: str = "dead") -> _GlooPending:
    p = _GlooPending(replica_id, device)
    p.finish(error=ReplicaFailure(replica_id, kind, detail))
    return p


class _Channel:
    """Rank 0 of one channel: sends go out from the caller's thread, `_read` completes them in order."""

    def __init__(self, replica_id: str, actor_id: str, key: str, pg: dist.ProcessGroupGloo):
        self.replica_id, self.actor_id, self.key, self.pg = replica_id, actor_id, key, pg
        self.broken: str | None = None  # why the connection ended
        self.capacity = FIRST_CAPACITY  # inline payload bytes of the request the replica has posted a receive for
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, name=f"moeserve-gloo-{replica_id}", daemon=True)
        self._thread.start()

    def send(self, batch: ExpertBatch, device: torch.device) -> _GlooPending:
        if self.broken is not None:
            return _failed(self.replica_id, device, self.broken)
        message, payload, self.capacity = pack_request(batch, self.capacity)
        n, h = batch.rows.shape
        reply = torch.empty(reply_nbytes(n, h, batch.rows.dtype), dtype=torch.uint8)
        pending = _GlooPending(self.replica_id, device)
        try:
            # The reply's receive first: the replica's answer then goes out the moment it is ready.
            works = [self.pg.recv([reply], 1, 0), self.pg.send([message], 1, 0)]
            if payload is not None:
                works.append(self.pg.send([payload], 1, 0))
        except RuntimeError as exc:
            self._break(exc)
            return _failed(self.replica_id, device, self.broken)
        # The item keeps the buffers alive until gloo is done with them.
        self._queue.put((pending, works, message, payload, reply, (n, h, batch.rows.dtype)))
        return pending

    def _read(self) -> None:
        while (item := self._queue.get()) is not None:
            pending, works, _, _, reply, shape = item
            try:
                for work in reversed(works):  # the sends, then the reply
                    work.wait(IDLE_TIMEOUT)
            except RuntimeError as exc:
                self._break(exc)
                pending.finish(error=ReplicaFailure(self.replica_id, "dead", self.broken))
                continue
            status, body = unpack_reply(reply, *shape)
            if status == OK:
                pending.finish(body)
            elif status in STATUS_KINDS:
                pending.finish(error=ReplicaFailure(self.replica_id, STATUS_KINDS[status], body))
            else:
                pending.finish(error=RuntimeError(f"expert group replica {self.replica_id}: {body}"))

    def _break(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = f"channel closed ({first_line(exc)})"

    def close(self) -> None:
        """Tell the replica the channel ends (it may already be gone), then stop the reader."""
        if self.broken is None:
            self.broken = "channel closed by the dispatcher"
            try:  # bounded: a replica process that is frozen, not gone, never takes it
                self.pg.send([close_message(self.capacity)], 1, 0).wait(CLOSE_TIMEOUT)
            except RuntimeError:
                pass
        self._queue.put(None)


class GlooTransport(Transport):
    """Sends over standing gloo channels, one per replica, opened on first use (see the module docstring).

    Used from one thread (the dispatcher's step thread), like every transport.
    """

    name = "gloo"

    def __init__(self, connect_timeout_s: float = 60.0):
        if connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s: must be > 0, got {connect_timeout_s}")
        self.connect_timeout_s = connect_timeout_s
        self._host: str | None = None
        self._store: dist.TCPStore | None = None
        self._channels: dict[str, _Channel] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._opened = 0

    @property
    def channels(self) -> dict[str, str | None]:
        """Replica id -> None while its channel is open, else why it closed."""
        return {r: ch.broken for r, ch in self._channels.items()}

    def send(self, replica_id: str, handle, batch: ExpertBatch, device: torch.device) -> Pending:
        if handle is None:  # a recovered controller serves a replica whose actor it did not find with no handle
            return _failed(replica_id, device, "no live actor (the controller is restoring it)")
        try:
            channel = self._channel(replica_id, handle)
        except ReplicaFailure as failure:
            return _failed(replica_id, device, failure.detail, failure.kind)
        return channel.send(batch, device)

    def wait(self, pending: list[Pending], timeout_s: float) -> list[Pending]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        for p in pending:
            if not p.done.wait(max(0.0, deadline - time.monotonic())):
                break
        return [p for p in pending if p.done.is_set()]

    def retain(self, replica_ids) -> None:
        keep = set(replica_ids)
        for replica_id in [r for r in self._channels if r not in keep]:
            self._channels.pop(replica_id).close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._store = None

    # --- opening channels ------------------------------------------------------------------------
    def _channel(self, replica_id: str, handle) -> _Channel:
        actor_id = handle._actor_id.hex()
        channel = self._channels.get(replica_id)
        if channel is not None and channel.actor_id == actor_id and channel.broken is None:
            return channel
        if channel is not None:
            channel.close()
            del self._channels[replica_id]
        channel = self._channels[replica_id] = self._open(replica_id, handle, actor_id)
        return channel

    def _open(self, replica_id: str, handle, actor_id: str) -> _Channel:
        if self._store is None:
            self._host = ray.util.get_node_ip_address()
            self._store = dist.TCPStore(self._host, 0, is_master=True, wait_for_workers=False)
        key = f"{self._prefix}-{self._opened}"
        self._opened += 1
        timeout = self.connect_timeout_s
        # Both ranks block in the rendezvous until the other arrives: join it on a helper thread while the
        # actor joins from its side; if the actor is gone, Ray says so and the helper times out on its own.
        joined: dict = {}

        def join() -> None:
            try:
                joined["pg"] = connect(self._store, key, 0, self._host, timeout)
            except RuntimeError as exc:
                joined["error"] = first_line(exc)

        helper = threading.Thread(target=join, name=f"moeserve-gloo-connect-{replica_id}", daemon=True)
        helper.start()
        try:
            ray.get(handle.open_channel.remote(key, self._host, self._store.port, timeout), timeout=timeout)
        except RayActorError as exc:
            raise ReplicaFailure(replica_id, "dead", f"could not open a channel: {type(exc).__name__}") from None
        except GetTimeoutError:
            raise ReplicaFailure(replica_id, "timeout", f"the actor did not open a channel in {timeout:g} s") from None
        except RayTaskError as exc:
            raise ReplicaFailure(replica_id, "dead", f"could not open a channel: {exc.cause!r}") from None
        helper.join(timeout)
        if "pg" not in joined:
            raise ReplicaFailure(replica_id, "dead", f"could not open a channel: {joined.get('error', 'timed out')}")
        log.info("gloo channel %s open to replica %s", key, replica_id)
        return _Channel(replica_id, actor_id, key, joined["pg"])
