"""Standing channels between a dispatcher and an expert-group replica: torch.distributed (gloo) send/recv.

The `ray` transport pays one Ray actor call per expert group per MoE layer (about 1 ms on a small
machine, docs/benchmarks.md); a channel pays one message there and one back over a TCP connection
that stays open. A channel is a two-rank gloo process group: rank 0 in the dispatcher's process,
which hosts the rendezvous store, rank 1 in the replica. This module is both ends' shared part: the
message layout, the rendezvous, and the replica's side (`ChannelServer`, a thread per channel that
runs each batch through the group's worker). The dispatcher's side is router/transport/gloo.py.

Messages, in order on the pair (each side sends and receives in one fixed order, so no tags). Gloo
moves a message at once only if the receiver has already posted its receive; otherwise the sender waits
for a round trip of notices. So every message has a size both sides know before it is sent, and the
receiver posts the next one early:
- request: one message of HEADER_BYTES + `capacity` bytes: a header of 16 int64 (op, layer, rows N,
  experts per row k, hidden H, the dtype codes of rows, ids and weights, whether the payload is inline,
  and the capacity of the next request), then the payload if it fits (ids [N, k], rows [N, H] and
  weights [N, k], ordered by element size, largest first, so that every part starts aligned). A payload
  that does not fit follows as a message of its own. The sender picks each next capacity from the
  payload it just sent (decode steps repeat their sizes), so the replica posts the next request's
  receive, at that capacity, before it runs the batch.
- reply: one message of `reply_nbytes(N, H, dtype)`: 2 int64 (status, length of what follows), then
  the output rows [N, H] (status OK) or a UTF-8 message (any other status).
Op CLOSE ends the channel; either side seeing the connection close (a process gone) ends it too.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from .batch import WIRE_DTYPES, ExpertBatch
from .errors import GroupDrainingError, StaleRoutingError

log = logging.getLogger(__name__)

OP_CLOSE, OP_RUN = 0, 1
OK, DRAINING, STALE, ERROR = 0, 1, 2, 3
STATUS_KINDS = {DRAINING: "draining", STALE: "stale"}  # statuses the dispatcher acts on (transport/base.py)
HEADER_LEN = 16
HEADER_BYTES = HEADER_LEN * 8
_OP, _LAYER, _N, _K, _H, _ROWS_DT, _IDS_DT, _WEIGHTS_DT, _INLINE, _NEXT_CAPACITY = range(10)
FIRST_CAPACITY = 16 << 10  # bytes of payload the first request carries inline
MAX_CAPACITY = 1 << 20  # a larger payload goes as a message of its own
_REPLY_HEAD = 16  # bytes: status and length as int64
_MIN_MESSAGE = 1024  # room for an error message in a reply, however few its rows
# Waits on an open channel have no deadline of their own: the dispatcher keeps the per-send deadline,
# and a peer that goes away closes the connection, which ends any wait at once.
IDLE_TIMEOUT = datetime.timedelta(days=365)

_CODE = {dt: i for i, dt in enumerate(WIRE_DTYPES)}


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _CODE:
        raise ValueError(f"channel: cannot carry {dtype}; one of {[str(d) for d in WIRE_DTYPES]}")
    return _CODE[dtype]


def first_line(exc: BaseException) -> str:
    """What to log or report of a gloo error: its first line (gloo appends advice after it)."""
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _layout(n: int, k: int, h: int, rows: torch.dtype, ids: torch.dtype, weights: torch.dtype):
    """(name, dtype, shape, nbytes) of the request's parts in buffer order: larger elements first keeps each
    aligned."""
    parts = [("local_ids", ids, (n, k)), ("rows", rows, (n, h)), ("weights", weights, (n, k))]
    return [(name, dt, shape, dt.itemsize * shape[0] * shape[1])
            for name, dt, shape in sorted(parts, key=lambda p: -p[1].itemsize)]


def _header_layout(header: list[int]):
    return _layout(header[_N], header[_K], header[_H], WIRE_DTYPES[header[_ROWS_DT]], WIRE_DTYPES[header[_IDS_DT]],
                   WIRE_DTYPES[header[_WEIGHTS_DT]])


def _views(buf: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """Each part of `layout` as a typed view of the byte buffer `buf`."""
    views, at = {}, 0
    for name, dt, shape, nbytes in layout:
        views[name] = buf[at:at + nbytes].view(dt).view(shape)
        at += nbytes
    return views


def next_capacity(payload_nbytes: int) -> int:
    """The inline capacity of the request after one with this payload: the next power of two, within bounds."""
    return min(MAX_CAPACITY, max(FIRST_CAPACITY, 1 << max(0, payload_nbytes - 1).bit_length()))


def pack_request(batch: ExpertBatch, capacity: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(message, separate payload or None, next capacity) for `batch`, on the CPU: the message has HEADER_BYTES
    + `capacity` bytes, the capacity the replica has posted. Each part is copied once, from its device into
    the host buffer that goes on the wire."""
    n, h = batch.rows.shape
    k = batch.local_ids.shape[1]
    layout = _layout(n, k, h, batch.rows.dtype, batch.local_ids.dtype, batch.weights.dtype)
    nbytes = sum(part[3] for part in layout)
    inline = nbytes <= capacity
    following = next_capacity(nbytes)
    message = torch.empty(HEADER_BYTES + capacity, dtype=torch.uint8)
    header = message[:HEADER_BYTES].numpy().view(np.int64)
    header[:] = 0
    header[:_NEXT_CAPACITY + 1] = (OP_RUN, batch.layer_id, n, k, h, dtype_code(batch.rows.dtype),
                                   dtype_code(batch.local_ids.dtype), dtype_code(batch.weights.dtype), int(inline),
                                   following)
    payload = message[HEADER_BYTES:HEADER_BYTES + nbytes] if inline else torch.empty(nbytes, dtype=torch.uint8)
    for name, view in _views(payload, layout).items():
        view.copy_(getattr(batch, name))  # from any device, straight into the wire buffer
    return message, None if inline else payload, following


def close_message(capacity: int) -> torch.Tensor:
    message = torch.zeros(HEADER_BYTES + capacity, dtype=torch.uint8)
    message[:HEADER_BYTES].view(torch.int64)[_OP] = OP_CLOSE
    return message


def read_header(message: torch.Tensor) -> list[int]:
    return message[:HEADER_BYTES].view(torch.int64).tolist()


def request_nbytes(header: list[int]) -> int:
    return sum(part[3] for part in _header_layout(header))


def unpack_request(header: list[int], payload: torch.Tensor) -> ExpertBatch:
    parts = _views(payload, _header_layout(header))
    return ExpertBatch(header[_LAYER], parts["rows"], parts["local_ids"], parts["weights"])


def reply_nbytes(n: int, h: int, dtype: torch.dtype) -> int:
    return _REPLY_HEAD + max(n * h * dtype.itemsize, _MIN_MESSAGE)


def pack_reply(nbytes: int, status: int, out: torch.Tensor | None = None, message: str = "") -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if out is not None:
        length = out.numel() * out.element_size()
        buf[_REPLY_HEAD:_REPLY_HEAD + length].view(out.dtype).view(out.shape).copy_(out)
    else:
        text = message.encode()[: nbytes - _REPLY_HEAD]
        length = len(text)
        buf[_REPLY_HEAD:_REPLY_HEAD + length].numpy()[:] = np.frombuffer(text, dtype=np.uint8)
    buf[:_REPLY_HEAD].numpy().view(np.int64)[:] = (status, length)
    return buf


def unpack_reply(buf: torch.Tensor, n: int, h: int, dtype: torch.dtype) -> tuple[int, torch.Tensor | str]:
    """(OK, rows [n, h]) or (another status, its message)."""
    status, length = buf[:_REPLY_HEAD].view(torch.int64).tolist()
    body = buf[_REPLY_HEAD:_REPLY_HEAD + length]
    if status == OK:
        return OK, body.view(dtype).reshape(n, h)
    return status, bytes(body.tolist()).decode(errors="replace")


def connect(store: dist.Store, key: str, rank: int, host: str, timeout_s: float) -> dist.ProcessGroupGloo:
    """Join the two-rank channel `key` as `rank`, reachable at `host`; blocks until the peer joins or
    `timeout_s` passes (RuntimeError)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = datetime.timedelta(seconds=timeout_s)  # the rendezvous; waits then pass IDLE_TIMEOUT
    return dist.ProcessGroupGloo(dist.PrefixStore(key, store), rank, 2, opts)


class ChannelServer:
    """The replica's end of one channel: a daemon thread that takes requests until CLOSE or the peer goes.

    `run(batch)` is the group's compute (ExpertGroupWorker.run behind the actor's lock); its draining and
    stale-routing errors go back as those statuses, anything else as ERROR with its message (and is logged).
    """

    def __init__(self, key: str, pg: dist.ProcessGroupGloo, run: Callable[[ExpertBatch], torch.Tensor],
                 on_exit: Callable[[str], None] | None = None):
        self.key, self._pg, self._run, self._on_exit = key, pg, run, on_exit
        self._thread = threading.Thread(target=self._loop, name=f"moeserve-channel-{key}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            message = torch.empty(HEADER_BYTES + FIRST_CAPACITY, dtype=torch.uint8)
            arrival = self._pg.recv([message], 0, 0)
            while True:
                arrival.wait(IDLE_TIMEOUT)
                header = read_header(message)
                if header[_OP] != OP_RUN:
                    return
                if header[_INLINE]:
                    payload = message[HEADER_BYTES:HEADER_BYTES + request_nbytes(header)]
                else:
                    payload = torch.empty(request_nbytes(header), dtype=torch.uint8)
                    self._pg.recv([payload], 0, 0).wait(IDLE_TIMEOUT)
                # The next request's receive is posted before the batch runs, so that request goes straight out.
                message = torch.empty(HEADER_BYTES + header[_NEXT_CAPACITY], dtype=torch.uint8)
                arrival = self._pg.recv([message], 0, 0)
                n, h, dtype = header[_N], header[_H], WIRE_DTYPES[header[_ROWS_DT]]
                reply = self._answer(unpack_request(header, payload), reply_nbytes(n, h, dtype))
                self._pg.send([reply], 0, 0).wait(IDLE_TIMEOUT)
        except RuntimeError as exc:  # the dispatcher's process went away: nothing left to answer
            log.info("channel %s closed: %s", self.key, first_line(exc))
        finally:
            if self._on_exit is not None:
                self._on_exit(self.key)

    def _answer(self, batch: ExpertBatch, nbytes: int) -> torch.Tensor:
        try:
            out = self._run(batch)
        except GroupDrainingError as exc:
            return pack_reply(nbytes, DRAINING, message=str(exc))
        except StaleRoutingError as exc:
            return pack_reply(nbytes, STALE, message=str(exc))
        except Exception as exc:  # a bug or a bad batch: the sender raises it; the channel stays usable
            log.exception("channel %s: batch for layer %d failed", self.key, batch.layer_id)
            return pack_reply(nbytes, ERROR, message=f"{type(exc).__name__}: {exc}")
        if out.dtype != batch.rows.dtype or tuple(out.shape) != tuple(batch.rows.shape):
            return pack_reply(nbytes, ERROR, message=f"expert group answered {tuple(out.shape)} {out.dtype} for rows "
                                                     f"{tuple(batch.rows.shape)} {batch.rows.dtype}")
        return pack_reply(nbytes, OK, out)
