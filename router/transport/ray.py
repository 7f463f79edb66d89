"""The `ray` transport: each send is one call of an `ExpertGroupActor`'s `run`.

Rows travel as numpy arrays (experts/batch.py): Ray inlines small ones in the call and puts large
ones in the object store, where the actor reads them zero-copy. CUDA tensors are copied to host
first and back after; that copy and the per-call overhead are what the `nccl` transport removes.
"""

from __future__ import annotations

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from moeserve.experts.batch import ExpertBatch, tensor_from_wire
from moeserve.experts.errors import GroupDrainingError, StaleRoutingError

from .base import Pending, ReplicaFailure, Transport


class _RayPending(Pending):
    def __init__(self, replica_id: str, ref: ray.ObjectRef, device: torch.device):
        self.replica_id, self.ref, self.device = replica_id, ref, device

    def result(self) -> torch.Tensor:
        if self.ref is None:
            raise ReplicaFailure(self.replica_id, "dead", "no live actor (the controller is restoring it)")
        try:
            wire = ray.get(self.ref, timeout=0)
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError
            raise ReplicaFailure(self.replica_id, "dead", type(exc).__name__) from None
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, GroupDrainingError):
                raise ReplicaFailure(self.replica_id, "draining", str(cause)) from None
            if isinstance(cause, StaleRoutingError):
                raise ReplicaFailure(self.replica_id, "stale", str(cause)) from None
            raise
        return tensor_from_wire(wire, self.device)


class RayTransport(Transport):
    name = "ray"

    def send(self, replica_id: str, handle, batch: ExpertBatch, device: torch.device) -> Pending:
        # A recovered controller serves a replica whose actor it did not find with no handle: a dead send.
        ref = None if handle is None else handle.run.remote(batch.to_wire())
        return _RayPending(replica_id, ref, device)

    def wait(self, pending: list[Pending], timeout_s: float) -> list[Pending]:
        dead = [p for p in pending if p.ref is None]
        by_ref = {p.ref: p for p in pending if p.ref is not None}
        if not by_ref:
            return dead
        timeout = 0.0 if dead else max(0.0, timeout_s)  # a dead send is done now: do not block on the rest
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=timeout, fetch_local=True)
        return dead + [by_ref[r] for r in ready]
