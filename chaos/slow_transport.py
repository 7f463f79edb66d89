"""A transport that adds latency to another: the "slow the transport" fault. Off (no delay) by default.

Each send's answer is held back until `delay_s` after it was sent, as a slow network would; the
rows themselves go through the real transport underneath.
"""

from __future__ import annotations

import time

import torch

from moeserve.experts.batch import ExpertBatch
from moeserve.router.transport.base import Pending, Transport


class _Delayed(Pending):
    def __init__(self, inner: Pending, due: float):
        self.inner, self.due, self.replica_id = inner, due, inner.replica_id

    def result(self) -> torch.Tensor:
        return self.inner.result()


class SlowTransport(Transport):
    """Wraps `inner`; set `delay_s` (from any thread) to slow every following send."""

    def __init__(self, inner: Transport):
        self.inner = inner
        self.name = f"slow-{inner.name}"
        self.delay_s = 0.0
        self.delayed_sends = 0

    def send(self, replica_id: str, handle, batch: ExpertBatch, device: torch.device) -> Pending:
        delay = self.delay_s
        if delay > 0:
            self.delayed_sends += 1
        return _Delayed(self.inner.send(replica_id, handle, batch, device), time.monotonic() + delay)

    def wait(self, pending: list[Pending], timeout_s: float) -> list[Pending]:
        give_up = time.monotonic() + timeout_s
        arrived = set(self.inner.wait([p.inner for p in pending], timeout_s))
        held = [p for p in pending if p.inner in arrived]
        if held:
            # The injected latency itself: answers that are here wait until they are due.
            pause = min(max(p.due for p in held), give_up) - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        now = time.monotonic()
        return [p for p in held if p.due <= now]

    def retain(self, replica_ids) -> None:
        self.inner.retain(replica_ids)

    def close(self) -> None:
        self.inner.close()
