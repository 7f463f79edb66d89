"""The `local` transport: expert groups are `ExpertGroupWorker`s in the trunk's own process. No copies."""

from __future__ import annotations

import torch

from moeserve.experts.batch import ExpertBatch
from moeserve.experts.errors import GroupDrainingError, StaleRoutingError
from moeserve.experts.worker import ExpertGroupWorker

from .base import Pending, ReplicaFailure, Transport


class _Done(Pending):
    def __init__(self, replica_id: str, value: torch.Tensor | None, error: ReplicaFailure | None):
        self.replica_id, self._value, self._error = replica_id, value, error

    def result(self) -> torch.Tensor:
        if self._error is not None:
            raise self._error
        return self._value


class LocalTransport(Transport):
    """Runs each send at once, in the caller's thread."""

    name = "local"

    def send(self, replica_id: str, handle: ExpertGroupWorker, batch: ExpertBatch, device: torch.device) -> Pending:
        try:
            return _Done(replica_id, handle.run(batch), None)
        except GroupDrainingError as exc:
            return _Done(replica_id, None, ReplicaFailure(replica_id, "draining", str(exc)))
        except StaleRoutingError as exc:
            return _Done(replica_id, None, ReplicaFailure(replica_id, "stale", str(exc)))

    def wait(self, pending: list[Pending], timeout_s: float) -> list[Pending]:
        return list(pending)
