"""Transports between the gating router and the expert groups: one interface, several ways to move rows.

`local` runs the groups in the trunk's process; `ray` calls expert-group actors, one Ray call per
group per MoE layer; `gloo` reaches the same actors over standing torch.distributed channels. A GPU
`nccl` transport would fit the same `Transport` interface (send rows to a replica, wait for answers).
"""

from .base import Pending, ReplicaFailure, Transport


TRANSPORTS = ("local", "ray", "gloo")
ACTOR_TRANSPORTS = ("ray", "gloo")  # those whose expert groups are Ray actors under the controller


def make_transport(name: str) -> Transport:
    """The transport called `name` (one of TRANSPORTS)."""
    if name == "local":
        from .local import LocalTransport

        return LocalTransport()
    if name == "ray":
        from .ray import RayTransport

        return RayTransport()
    if name == "gloo":
        from .gloo import GlooTransport

        return GlooTransport()
    raise ValueError(f"transport: {name!r} is not one of {list(TRANSPORTS)}")


__all__ = ["ACTOR_TRANSPORTS", "TRANSPORTS", "Pending", "ReplicaFailure", "Transport", "make_transport"]
