"""The controller's record of each expert-group replica, and the Ray calls that start, probe and stop one.

Replica ids (`g{group}r{serial}`) are stable across restarts; each restart is a new *incarnation*
with a new actor, named `{cluster}-{replica}-{incarnation}` in the cluster's namespace, so a
restarted controller finds its groups again by name.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError

from moeserve.experts.group import ExpertGroupActor, GroupResources

log = logging.getLogger(__name__)

# Replica states: starting -> serving -> (restarting -> serving)* -> draining -> gone; or failed.
SERVING, STARTING, RESTARTING, DRAINING, FAILED = "serving", "starting", "restarting", "draining", "failed"


@dataclass
class ReplicaRecord:
    replica_id: str
    group_id: int
    incarnation: int = 0
    state: str = STARTING
    handle: object | None = None
    info: dict = field(default_factory=dict)  # what the actor's ready() said: node, device, pid, experts
    restarts: list[float] = field(default_factory=list)  # monotonic times of recent restarts

    def actor_name(self, cluster: str) -> str:
        return f"{cluster}-{self.replica_id}-{self.incarnation}"

    def persisted(self) -> dict:
        return {"group_id": self.group_id, "incarnation": self.incarnation, "state": self.state}


async def spawn_replica(rec: ReplicaRecord, experts: tuple[int, ...], *, cluster: str, namespace: str, source,
                        resources: GroupResources, detached: bool, load_window_s: float, timeout_s: float) -> None:
    """Start the actor of `rec`'s current incarnation and wait until its weights are loaded."""
    opts = resources.actor_options(rec.group_id)
    opts.update(name=rec.actor_name(cluster), namespace=namespace, max_restarts=0, max_task_retries=0)
    if detached:
        opts["lifetime"] = "detached"  # outlives a controller restart; the controller kills it on drain/shutdown
    handle = ExpertGroupActor.options(**opts).remote(rec.group_id, tuple(experts), source, resources, load_window_s)
    try:
        info = await asyncio.wait_for(handle.ready.remote(), timeout_s)
    except BaseException:
        ray.kill(handle, no_restart=True)
        raise
    rec.handle, rec.info = handle, info


def find_replica(rec: ReplicaRecord, *, cluster: str, namespace: str) -> object | None:
    """The live actor of `rec`'s incarnation, or None (after a controller restart)."""
    try:
        return ray.get_actor(rec.actor_name(cluster), namespace=namespace)
    except ValueError:
        return None


def kill_replica(rec: ReplicaRecord) -> None:
    if rec.handle is not None:
        try:
            ray.kill(rec.handle, no_restart=True)
        except Exception:  # already gone
            pass


async def probe(rec: ReplicaRecord, timeout_s: float, stall_s: float) -> str | None:
    """None if healthy, else why not: 'dead', 'timeout' (no answer) or 'stalled' (a batch runs too long)."""
    if rec.handle is None:
        return "dead"
    try:
        health = await asyncio.wait_for(rec.handle.health.remote(), timeout_s)
    except RayActorError:
        return "dead"
    except asyncio.TimeoutError:
        return "timeout"
    running = health.get("running_for_s")
    if running is not None and running > stall_s:
        return "stalled"
    return None


async def call_all(calls: dict[str, object], timeout_s: float) -> dict[str, object]:
    """Await many actor calls concurrently; a failed or late one maps to its exception."""

    async def one(ref):
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except Exception as exc:  # noqa: BLE001 - the caller decides what each failure means
            return exc

    keys = list(calls)
    results = await asyncio.gather(*(one(calls[k]) for k in keys))
    return dict(zip(keys, results))
