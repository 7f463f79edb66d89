"""The faults a chaos scenario injects, one kind per class. `inject` does one fault and returns once
recovery is seen (or raises); `clear` undoes whatever a fault may have left behind at the end."""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod

import ray
from ray.exceptions import RayActorError

from .cluster import EmbeddedCluster
from .load import LoadGenerator
from .report import FaultRecord

_WATCH_S = 10.0  # one long poll on the controller while waiting for a recovery


class Fault(ABC):
    kind: str

    def __init__(self) -> None:
        self.count = 0  # faults injected so far; picks the next target round-robin

    @abstractmethod
    async def inject(self, cluster: EmbeddedCluster, load: LoadGenerator) -> FaultRecord: ...

    async def clear(self, cluster: EmbeddedCluster) -> None:
        """Undo what the last fault may have left (nothing by default)."""

    def _record(self, target: str, start: float, detail: str = "") -> FaultRecord:
        self.count += 1
        return FaultRecord(self.kind, target, start, time.monotonic(), detail)


async def _next_replica(cluster: EmbeddedCluster, n: int) -> tuple[str, int, object]:
    """(replica id, incarnation, actor handle) of the n-th serving replica, round-robin."""
    serving = await cluster.controller.snapshot.remote()
    rid = sorted(serving.handles)[n % len(serving.handles)]
    return rid, serving.incarnations[rid], serving.handles[rid]


async def _wait_restarted(cluster: EmbeddedCluster, replica_id: str, incarnation: int) -> None:
    """Until the controller serves `replica_id` at a newer incarnation whose actor answers (long polls,
    no sleeping); a restarting controller or a served actor that is gone just means: keep watching."""
    observer = f"chaos-observer-{uuid.uuid4().hex[:6]}"
    controller = cluster.controller
    try:
        serving = None
        while True:
            try:
                if serving is None:
                    serving = await controller.snapshot.remote()
                handle = serving.handles.get(replica_id)
                if serving.incarnations.get(replica_id, -1) > incarnation and handle is not None:
                    try:
                        await handle.health.remote()
                        return
                    except RayActorError:
                        pass  # served but gone: the controller replaces it at a newer epoch
                serving = await controller.watch.remote(observer, serving.epoch, _WATCH_S) or serving
            except RayActorError:  # the controller is restarting; Ray holds the next call until it is back
                serving = None
    finally:
        controller.forget_dispatcher.remote(observer)


class KillExpertGroup(Fault):
    """ray.kill one expert-group replica; recovered when the controller serves its restarted self."""

    kind = "kill-expert-group"

    async def inject(self, cluster, load):
        rid, incarnation, handle = await _next_replica(cluster, self.count)
        start = time.monotonic()
        ray.kill(handle, no_restart=True)
        await _wait_restarted(cluster, rid, incarnation)
        return self._record(rid, start)


class KillControllerMidRestart(Fault):
    """Kill a replica, have the controller start replacing it, and kill the controller mid-restart;
    recovered when the restarted controller serves the replica's newer incarnation."""

    kind = "kill-controller-mid-restart"

    async def inject(self, cluster, load):
        rid, incarnation, handle = await _next_replica(cluster, self.count)
        start = time.monotonic()
        ray.kill(handle, no_restart=True)
        # Returns once the controller has begun the restart (weights loading in a new actor for a while).
        await cluster.controller.report_failures.remote({rid: (incarnation, "dead")})
        ray.kill(cluster.controller, no_restart=False)
        await _wait_restarted(cluster, rid, incarnation)
        return self._record(rid, start)


class StallExpertGroup(Fault):
    """Make one replica hold every batch for `stall_s`, far past the dispatch deadline; recovered when
    the dispatcher has given up on it and the controller serves a restarted replica."""

    kind = "stall-expert-group"

    def __init__(self, stall_s: float = 60.0):
        super().__init__()
        self.stall_s = stall_s

    async def inject(self, cluster, load):
        rid, incarnation, handle = await _next_replica(cluster, self.count)
        await handle.inject_delay.remote(self.stall_s)
        start = time.monotonic()
        await _wait_restarted(cluster, rid, incarnation)
        return self._record(rid, start, f"stalled {self.stall_s:.0f}s")


class KillTrunk(Fault):
    """ray.kill the trunk worker; recovered when the edge has restarted it and resubmitted its requests."""

    kind = "kill-trunk-worker"

    async def inject(self, cluster, load):
        engine = cluster.engine
        restarts = engine.restarts
        resubmitted = engine.resubmitted
        start = time.monotonic()
        ray.kill(engine.worker, no_restart=True)
        await engine.wait_restarts(restarts + 1)
        return self._record("trunk", start, f"{engine.resubmitted - resubmitted} requests resubmitted")


class StallTrunk(Fault):
    """Make the trunk worker sleep `stall_s` before every step, far past the edge's stall timeout (its actor
    still answers polls); recovered when the edge has seen the stall, killed and restarted the worker
    and resubmitted its requests."""

    kind = "stall-trunk-worker"

    def __init__(self, stall_s: float = 60.0):
        super().__init__()
        self.stall_s = stall_s

    async def inject(self, cluster, load):
        engine = cluster.engine
        restarts, resubmitted, stalls = engine.restarts, engine.resubmitted, engine.stalls
        await engine.worker.inject_delay.remote(self.stall_s)
        start = time.monotonic()
        await engine.wait_restarts(restarts + 1)
        if engine.stalls == stalls:
            raise RuntimeError(f"the trunk worker was restarted (restarts {engine.restarts}) without a stall "
                               f"being detected: something other than the stall ended it")
        return self._record("trunk", start, f"stalled {self.stall_s:.0f}s, "
                                            f"{engine.resubmitted - resubmitted} requests resubmitted")


class ScaleTrunkWorkers(Fault):
    """Drain one of the pool's n trunk workers (`TrunkPool.scale(n - 1)`: the least busy takes no new request
    and finishes what it holds, then stops) and, once it has stopped, add one back (`scale(n)`); recovered
    when n serve again. Nothing is resubmitted: the drained worker's requests end where they started."""

    kind = "scale-trunk-workers"

    async def inject(self, cluster, load):
        from moeserve.router.trunk_pool import DRAINING, STARTING

        pool = cluster.engine
        serving = pool.replicas
        if serving < 2 or pool.pending or pool.members(DRAINING):
            raise RuntimeError(f"the trunk pool is not settled at n >= 2 serving (serving {serving}, "
                               f"starting {pool.pending}, draining {len(pool.members(DRAINING))})")
        restarts = pool.restarts
        start = time.monotonic()
        pool.scale(serving - 1)
        (leaving,) = pool.members(DRAINING)
        held = len(leaving.engine.in_flight)
        # The pool's own drain task: it ends once the worker has finished its requests and stopped (shielded,
        # so a recovery timeout here does not cancel the drain).
        await asyncio.shield(leaving.task)
        if leaving in pool.members():
            raise RuntimeError(f"trunk worker #{leaving.index}: its drain ended but it is still a member")
        pool.scale(serving)
        (joining,) = pool.members(STARTING)
        await asyncio.shield(joining.task)  # ends once it serves, or once it failed to start (then it is gone)
        if pool.replicas != serving:
            raise RuntimeError(f"trunk worker #{joining.index} did not come to serve: {pool.replicas} serving, "
                               f"not {serving}; last events {pool.events[-3:]}")
        if pool.restarts != restarts:  # a drain resubmits nothing; a restart means a worker died or stalled
            raise RuntimeError(f"a trunk worker was restarted during the scaling ({pool.restarts - restarts} "
                               f"restart(s)): something other than the drain ended one")
        return self._record(f"trunk #{leaving.index}", start,
                            f"drained holding {held}, #{joining.index} serving")


class KillController(Fault):
    """Kill the controller actor (Ray restarts it and it recovers its state); recovered when it answers."""

    kind = "kill-controller"

    async def inject(self, cluster, load):
        controller = cluster.controller
        epoch = (await controller.snapshot.remote()).epoch
        observer = f"chaos-observer-{uuid.uuid4().hex[:6]}"
        start = time.monotonic()
        ray.kill(controller, no_restart=False)
        try:
            # The restarted controller recovers at a newer epoch, so this poll only ends on the new one
            # (the dying one may still answer a call made just after the kill).
            serving = None
            while serving is None:
                try:
                    serving = await controller.watch.remote(observer, epoch, _WATCH_S)
                except RayActorError:  # the call reached the dying controller; Ray holds the next one
                    continue
        finally:
            controller.forget_dispatcher.remote(observer)
        return self._record("controller", start, f"back at epoch {serving.epoch}")


class SlowTransport(Fault):
    """Add `delay_s` to every send to the expert groups while `hold_requests` requests complete."""

    kind = "slow-transport"

    def __init__(self, delay_s: float = 0.05, hold_requests: int = 4):
        super().__init__()
        self.delay_s, self.hold_requests = delay_s, hold_requests

    async def inject(self, cluster, load):
        start = time.monotonic()
        cluster.transport.delay_s = self.delay_s
        try:
            await load.wait_completed(load.completed + self.hold_requests)
        finally:
            cluster.transport.delay_s = 0.0
        return self._record(f"{cluster.transport.inner.name} transport", start, f"+{self.delay_s * 1000:.0f} ms per send")

    async def clear(self, cluster):
        cluster.transport.delay_s = 0.0


class DrainDuringBurst(Fault):
    """Start a second replica of a group, send a burst of requests, and drain the first replica meanwhile."""

    kind = "drain-during-burst"

    def __init__(self, burst: int = 16):
        super().__init__()
        self.burst = burst

    async def inject(self, cluster, load):
        serving = await cluster.controller.snapshot.remote()
        groups = serving.placement.groups
        group = groups[self.count % len(groups)].group_id
        old = serving.placement.replicas_of(group)[0]
        await cluster.controller.add_replica.remote(group)
        load.burst(self.burst)
        start = time.monotonic()
        drained = await cluster.controller.drain.remote(replica_id=old)
        return self._record(old, start, f"drained {drained} during a burst of {self.burst}")

