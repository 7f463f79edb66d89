"""Transports between the gating router and the expert groups: one interface, several ways to move rows.

`local` runs the groups in the trunk's process; `ray` calls expert-group actors. A GPU `nccl`
transport fits the same `Transport` interface (send rows to a replica, wait for answers).
"""

from .base import Pending, ReplicaFailure, Transport


def make_transport(name: str) -> Transport:
    """The transport called `name` ('local' or 'ray')."""
    if name == "local":
        from .local import LocalTransport

        return LocalTransport()
    if name == "ray":
        from .ray import RayTransport

        return RayTransport()
    raise ValueError(f"transport: {name!r} is not one of ['local', 'ray']")


__all__ = ["Pending", "ReplicaFailure", "Transport", "make_transport"]
