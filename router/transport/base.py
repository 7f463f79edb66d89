"""The transport interface: send an `ExpertBatch` to one replica, wait for the answers.

A transport moves bytes and reports how a send ended; it never retries or chooses replicas (the
dispatcher does). Failures come back as `ReplicaFailure` with a kind the dispatcher acts on:
- "dead": the replica is gone (actor died); ask the controller for its restarted self;
- "draining": the replica is leaving the serving set; send to the current set instead;
- "stale": the replica's experts differ from the sender's placement; refresh the placement;
- "timeout": set by the dispatcher when a send passes its deadline.
Any other error (a bug, a bad shape) propagates as itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch

from moeserve.experts.batch import ExpertBatch


class ReplicaFailure(Exception):
    """A send to `replica_id` did not produce rows; `kind` says why (see module docstring)."""

    def __init__(self, replica_id: str, kind: str, detail: str = ""):
        super().__init__(f"replica {replica_id}: {kind}{': ' + detail if detail else ''}")
        self.replica_id, self.kind, self.detail = replica_id, kind, detail


class Pending(ABC):
    """One send in flight."""

    replica_id: str

    @abstractmethod
    def result(self) -> torch.Tensor:
        """The replica's rows [N, H] on the sender's device; raises ReplicaFailure. Call once done."""


class Transport(ABC):
    name: str

    @abstractmethod
    def send(self, replica_id: str, handle: Any, batch: ExpertBatch, device: torch.device) -> Pending:
        """Start running `batch` on the replica behind `handle`; never blocks on the answer."""

    @abstractmethod
    def wait(self, pending: list[Pending], timeout_s: float) -> list[Pending]:
        """Block until every send in `pending` is done or `timeout_s` passes; return those done."""

    def retain(self, replica_ids: Iterable[str]) -> None:
        """The dispatcher adopted a serving set of `replica_ids` (between steps, or in a recovery): release what
        is held for any other replica (nothing by default). Never called concurrently with `send`; sends still
        outstanding to a replica let go of here must still complete."""

    def close(self) -> None:
        """Release what the transport holds (nothing by default)."""
