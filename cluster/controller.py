"""The controller: the one owner of expert placement, the serving set and its epoch.

It is a Ray actor (asyncio), not an object inside the serve process, for three reasons: the chaos
suite must be able to kill it alone; Ray restarts it (`max_restarts=-1`) and it recovers its state
from the GCS key-value store and finds its detached group actors by name, so a restart loses no
expert group; and every trunk process, the admin service and the autoscaler reach the same one by
name. Dispatchers do not call it per step: they hold a long-poll (`watch`) that returns when the
epoch moves, so the hot path costs nothing.

Every change of the serving set bumps the epoch: replicas added, removed, drained, restarted, or a
hot expert given an extra replica. A removed replica keeps serving until every live dispatcher has
acknowledged the new epoch (adopted at a step boundary), then drains (finishes what it holds) and
exits, so no request fails because the set changed.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from dataclasses import dataclass, field

import ray
from ray.experimental import internal_kv

from moeserve.experts.group import GroupResources

from .placement import (Placement, PlacementError, ServingSet, contiguous_groups, group_for_extra_replica,
                        reassign_experts)
from .replicas import (DRAINING, FAILED, RESTARTING, SERVING, ReplicaRecord, call_all, find_replica,
                       kill_replica, probe, spawn_replica)

log = logging.getLogger(__name__)

# Calls safe to repeat (reads; failure reports, keyed by incarnation) that meet the controller restarting go
# again to its restarted self; changes (scale, drain) are not repeated: their caller sees the failure.
_retried_read = ray.method(max_task_retries=-1)


@dataclass(frozen=True)
class ControllerConfig:
    """How the expert groups of one cluster are laid out, started and watched."""

    weights: object  # experts.weights.CheckpointWeights or RandomWeights
    num_experts: int
    num_groups: int = 2
    replicas_per_group: int = 1
    resources: GroupResources = field(default_factory=GroupResources)
    name: str = "moeserve"  # prefixes actor names and the persisted state key
    namespace: str = "moeserve"
    detached_groups: bool = True
    load_window_s: float = 60.0
    start_timeout_s: float = 300.0
    health_interval_s: float = 2.0
    health_timeout_s: float = 10.0
    stall_timeout_s: float = 60.0  # a batch running longer than this marks its replica stalled
    max_restarts: int = 5  # per replica within restart_window_s; beyond that the replica is failed
    restart_window_s: float = 600.0
    drain_timeout_s: float = 60.0
    # A dispatcher neither watching nor heard from this long no longer holds up a drain and is forgotten.
    dispatcher_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts: must be >= 1, got {self.num_experts}")
        if not 1 <= self.num_groups <= self.num_experts:
            raise ValueError(f"num_groups: must be in 1..{self.num_experts} (num_experts), got {self.num_groups}")
        if self.replicas_per_group < 1:
            raise ValueError(f"replicas_per_group: must be >= 1, got {self.replicas_per_group}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must be >= 0, got {self.max_restarts}")
        for name in ("start_timeout_s", "health_interval_s", "health_timeout_s", "stall_timeout_s", "drain_timeout_s",
                     "dispatcher_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    @property
    def actor_name(self) -> str:
        return f"{self.name}-controller"

    @property
    def state_key(self) -> bytes:
        return f"moeserve/controller/{self.name}".encode()


class ExpertController:
    """See the module docstring; construct with `start_controller`."""

    def __init__(self, config: ControllerConfig):
        self.cfg = config
        self.placement = Placement(config.num_experts, ())
        self.records: dict[str, ReplicaRecord] = {}
        self.serial: dict[int, int] = {}
        self._lock = asyncio.Lock()  # one change of the serving set at a time
        self._cond = asyncio.Condition()  # epoch moved or a dispatcher acknowledged
        self._acks: dict[str, tuple[int, float]] = {}  # live dispatcher -> (adopted epoch, last seen)
        self._autoscaler_lease: tuple[str, float] | None = None  # (holder, monotonic expiry)
        self._watching: dict[str, int] = {}  # dispatcher -> its watch calls running now (none: absent)
        self._forgotten: dict[str, float] = {}  # dispatcher -> when forget_dispatcher said it is gone
        self._restarts: dict[str, asyncio.Task] = {}
        self._background: asyncio.Task | None = None
        self._recover()

    # --- state that survives a controller restart ------------------------------------------------
    def _persist(self) -> None:
        state = {"placement": self.placement, "serial": self.serial,
                 "records": {r: rec.persisted() for r, rec in self.records.items()}}
        internal_kv._internal_kv_put(self.cfg.state_key, pickle.dumps(state), overwrite=True)

    def _recover(self) -> None:
        raw = internal_kv._internal_kv_get(self.cfg.state_key)
        if not raw:
            return
        state = pickle.loads(raw)
        self.serial = state["serial"]
        serving = set(state["placement"].all_replicas())
        for rid, r in state["records"].items():
            rec = ReplicaRecord(rid, r["group_id"], r["incarnation"], SERVING)
            rec.handle = find_replica(rec, cluster=self.cfg.name, namespace=self.cfg.namespace)
            if rid in serving:
                self.records[rid] = rec
            else:  # was starting or draining when the controller died: finish it off
                kill_replica(rec)
        # A new epoch: dispatchers re-fetch handles; replicas not found are restarted by the health loop.
        self.placement = state["placement"].with_epoch(state["placement"].epoch + 1)
        log.warning("controller recovered at epoch %d with %d replicas", self.placement.epoch, len(self.records))
        self._persist()

    # --- helpers -----------------------------------------------------------------------------------
    def _ensure_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._health_loop())

    async def _bump(self, placement: Placement) -> None:
        self.placement = placement.with_epoch(self.placement.epoch + 1)
        self._persist()
        async with self._cond:
            self._cond.notify_all()

    def _serving_set(self) -> ServingSet:
        reps = self.placement.all_replicas()
        return ServingSet(self.placement, {r: self.records[r].handle for r in reps},
                          {r: self.records[r].incarnation for r in reps})

    def _new_record(self, group_id: int) -> ReplicaRecord:
        n = self.serial.get(group_id, 0)
        self.serial[group_id] = n + 1
        rec = ReplicaRecord(f"g{group_id}r{n}", group_id)
        self.records[rec.replica_id] = rec
        return rec

    async def _spawn(self, rec: ReplicaRecord) -> None:
        experts = self.placement.group(rec.group_id).experts
        await spawn_replica(rec, experts, cluster=self.cfg.name, namespace=self.cfg.namespace, source=self.cfg.weights,
                            resources=self.cfg.resources, detached=self.cfg.detached_groups,
                            load_window_s=self.cfg.load_window_s, timeout_s=self.cfg.start_timeout_s)

    async def _catch_up(self, rec: ReplicaRecord) -> None:
        """Load experts added to the group's spec while `rec` was starting (specs only ever grow)."""
        want = self.placement.group(rec.group_id).experts
        have = tuple(rec.info.get("experts", ()))
        if have != want[: len(have)]:
            raise PlacementError(f"replica {rec.replica_id} holds {list(have)}, group {rec.group_id} is {list(want)}")
        if len(have) < len(want):
            rec.info["experts"] = await asyncio.wait_for(rec.handle.add_experts.remote(list(want[len(have):])),
                                                         self.cfg.start_timeout_s)

    async def _expert_load(self) -> dict[int, float]:
        stats = await self._collect_stats()
        load: dict[int, float] = {}
        for s in stats.values():
            if isinstance(s, dict):
                for per_expert in s["per_layer"].values():
                    for e, n in per_expert.items():
                        load[e] = load.get(e, 0.0) + n
        return load

    async def _collect_stats(self) -> dict[str, object]:
        calls = {r: rec.handle.stats.remote() for r, rec in self.records.items() if rec.handle is not None
                 and rec.state in (SERVING, DRAINING)}
        return await call_all(calls, self.cfg.health_timeout_s)

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> int:
        """Start every group's replicas (idempotent: a recovered controller keeps what it has); the epoch."""
        self._ensure_background()
        async with self._lock:
            if self.placement.groups:
                return self.placement.epoch
            groups = contiguous_groups(self.cfg.num_experts, self.cfg.num_groups)
            self.placement = Placement(self.cfg.num_experts, groups)
            recs = [self._new_record(g.group_id) for g in groups for _ in range(self.cfg.replicas_per_group)]
            try:
                await asyncio.gather(*(self._spawn(rec) for rec in recs))
            except BaseException:
                for rec in recs:
                    kill_replica(rec)
                self.records.clear()
                self.placement = Placement(self.cfg.num_experts, ())
                raise
            placement = self.placement
            for rec in recs:
                rec.state = SERVING
                placement = placement.with_replica(rec.group_id, rec.replica_id)
            await self._bump(placement)
            return self.placement.epoch

    async def shutdown(self) -> None:
        """Stop every group and forget the persisted state."""
        if self._background is not None:
            self._background.cancel()
        async with self._lock:
            for rec in self.records.values():
                kill_replica(rec)
            self.records.clear()
            self.placement = Placement(self.cfg.num_experts, (), (), self.placement.epoch + 1)
            internal_kv._internal_kv_del(self.cfg.state_key)
            async with self._cond:
                self._cond.notify_all()

    # --- dispatchers -------------------------------------------------------------------------------------
    @_retried_read
    async def snapshot(self) -> ServingSet:
        self._ensure_background()
        return self._serving_set()

    @_retried_read
    async def watch(self, dispatcher_id: str, adopted_epoch: int, timeout_s: float) -> ServingSet | None:
        """Long-poll: the serving set once the epoch passes `adopted_epoch` (None after `timeout_s`).

        Calling it says that `dispatcher_id` routes with `adopted_epoch` now (the drain acknowledgement).
        """
        self._ensure_background()
        self._prune_dispatchers()
        # A call that reaches the controller after its dispatcher was forgotten (sent by a worker just before
        # it was killed, delivered after the edge's forget) is answered but does not bring it back.
        live = dispatcher_id not in self._forgotten
        if live:
            self._acks[dispatcher_id] = (adopted_epoch, time.monotonic())
            self._watching[dispatcher_id] = self._watching.get(dispatcher_id, 0) + 1
        try:
            async with self._cond:
                self._cond.notify_all()
                await asyncio.wait_for(self._cond.wait_for(lambda: self.placement.epoch > adopted_epoch), timeout_s)
            return self._serving_set()
        except asyncio.TimeoutError:
            return None
        finally:
            if live:
                left = self._watching.pop(dispatcher_id) - 1
                if left:
                    self._watching[dispatcher_id] = left
            # A set just returned is adopted at the caller's next step boundary and it may route with its old
            # epoch until then: seen now, it holds a drain up for dispatcher_ttl_s more. Forgotten: stays so.
            if dispatcher_id in self._acks:
                self._acks[dispatcher_id] = (self._acks[dispatcher_id][0], time.monotonic())

    @_retried_read
    async def forget_dispatcher(self, dispatcher_id: str) -> None:
        """`dispatcher_id` routes no more (closed, or its process is gone): no drain waits for it from now on.

        A call of its still running (a dead caller's long poll, which Ray does not cancel) does not bring it back.
        """
        self._acks.pop(dispatcher_id, None)
        self._forgotten[dispatcher_id] = time.monotonic()
        async with self._cond:
            self._cond.notify_all()

    def _prune_dispatchers(self) -> float | None:
        """Forget the dispatchers neither watching nor heard from for dispatcher_ttl_s (a process that died
        without `forget_dispatcher`); the seconds until the next one would be, None if none can be."""
        now, ttl = time.monotonic(), self.cfg.dispatcher_ttl_s
        for d, when in list(self._forgotten.items()):  # a call still in flight after this long is not expected
            if now - when >= ttl:
                del self._forgotten[d]
        for d, (_, seen) in list(self._acks.items()):
            if d not in self._watching and now - seen >= ttl:
                del self._acks[d]
        return min((seen + ttl - now for d, (_, seen) in self._acks.items() if d not in self._watching), default=None)

    async def _wait_acks(self, epoch: int, timeout_s: float) -> bool:
        """Until every live dispatcher routes with `epoch` or later; False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        async with self._cond:
            while True:
                expiry = self._prune_dispatchers()
                if all(e >= epoch for e, _ in self._acks.values()):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("dispatchers did not all adopt epoch %d in %.0fs: %s", epoch, timeout_s, self._acks)
                    return False
                # Woken by an acknowledgement, a forget or a new epoch; else when the next silent one expires.
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining if expiry is None else min(remaining, expiry))
                except asyncio.TimeoutError:
                    pass

    # --- failures --------------------------------------------------------------------------------------
    @_retried_read
    async def report_failures(self, failures: dict[str, tuple[int, str]]) -> None:
        """A dispatcher saw these replicas fail; restart the dead and stalled ones in the background."""
        for rid, (incarnation, kind) in failures.items():
            if kind in ("dead", "timeout"):
                self._restart_task(rid, incarnation, kind)

    @_retried_read
    async def repair(self, failures: dict[str, tuple[int, str]], timeout_s: float) -> ServingSet:
        """Restore the failed replicas (bounded by `timeout_s`) and return the serving set."""
        tasks = [self._restart_task(rid, inc, kind) for rid, (inc, kind) in failures.items() if kind in ("dead", "timeout")]
        tasks = [t for t in tasks if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        return self._serving_set()

    def _restart_task(self, rid: str, incarnation: int, reason: str) -> asyncio.Task | None:
        running = self._restarts.get(rid)
        if running is not None and not running.done():
            return running
        rec = self.records.get(rid)
        if rec is None or rec.incarnation != incarnation or rec.state != SERVING:
            return None
        task = asyncio.get_running_loop().create_task(self._restart(rid, incarnation, reason))
        self._restarts[rid] = task
        return task

    async def _restart(self, rid: str, incarnation: int, reason: str) -> None:
        async with self._lock:
            rec = self.records.get(rid)
            if rec is None or rec.incarnation != incarnation or rec.state != SERVING:
                return
            log.warning("replica %s (incarnation %d) is %s; restarting it", rid, incarnation, reason)
            kill_replica(rec)
            now = time.monotonic()
            rec.restarts = [t for t in rec.restarts if now - t < self.cfg.restart_window_s]
            if len(rec.restarts) >= self.cfg.max_restarts:
                return await self._fail(rec, f"{len(rec.restarts)} restarts in {self.cfg.restart_window_s:.0f}s")
            rec.restarts.append(now)
            rec.incarnation += 1
            rec.state, rec.handle = RESTARTING, None
            # Persisted before the actor exists: a controller restarted mid-spawn then looks for this
            # incarnation's actor and never starts another under the same (taken) name.
            self._persist()
            try:
                await self._spawn(rec)
                await self._catch_up(rec)
            except Exception as exc:  # noqa: BLE001 - any failure to start leaves the replica failed
                kill_replica(rec)
                return await self._fail(rec, f"restart failed: {exc!r}")
            rec.state = SERVING
            await self._bump(self.placement)  # same layout, new handle

    async def _fail(self, rec: ReplicaRecord, why: str) -> None:
        log.error("replica %s of group %d failed for good (%s)", rec.replica_id, rec.group_id, why)
        rec.state, rec.handle = FAILED, None
        placement = self.placement
        if rec.replica_id in placement.all_replicas():
            placement = placement.without_replica(rec.replica_id)
        await self._bump(placement)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)  # the probe period, not a synchronisation
            try:
                serving = [rec for rec in self.records.values() if rec.state == SERVING]
                verdicts = await asyncio.gather(*(probe(rec, self.cfg.health_timeout_s, self.cfg.stall_timeout_s)
                                                  for rec in serving))
                for rec, verdict in zip(serving, verdicts):
                    if verdict is not None:
                        self._restart_task(rec.replica_id, rec.incarnation, verdict)
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad probe
                log.exception("health loop")

    # --- changing the serving set ------------------------------------------------------------------------
    async def add_replica(self, group_id: int) -> str:
        """Start one more replica of `group_id`; it serves from the next epoch. Returns its id."""
        async with self._lock:
            self.placement.group(group_id)
            rec = self._new_record(group_id)
            try:
                await self._spawn(rec)
                await self._catch_up(rec)
            except BaseException:
                kill_replica(rec)
                del self.records[rec.replica_id]
                raise
            rec.state = SERVING
            await self._bump(self.placement.with_replica(group_id, rec.replica_id))
            return rec.replica_id

    async def scale(self, group_id: int, replicas: int) -> list[str]:
        """Run exactly `replicas` replicas of `group_id` (drained newest first); the serving ids."""
        if replicas < 1:
            raise PlacementError(f"replicas: must be >= 1, got {replicas}; use drain to remove group {group_id}")
        self.placement.group(group_id)
        while len(self.placement.replicas_of(group_id)) < replicas:
            await self.add_replica(group_id)
        while len(self.placement.replicas_of(group_id)) > replicas:
            await self.drain(replica_id=self.placement.replicas_of(group_id)[-1])
        return list(self.placement.replicas_of(group_id))

    async def replicate_expert(self, expert: int, group_id: int | None = None) -> int:
        """Give hot `expert` one more home: `group_id`, or the least-loaded group not holding it."""
        async with self._lock:
            if group_id is None:
                group_id = group_for_extra_replica(self.placement, expert, await self._expert_load())
            placement = self.placement.with_expert(group_id, expert)  # validates
            await self._load_into_group(group_id, [expert])
            await self._bump(placement)
            return group_id

    async def _load_into_group(self, group_id: int, experts: list[int]) -> None:
        calls = {r: self.records[r].handle.add_experts.remote(experts) for r in self.placement.replicas_of(group_id)}
        results = await call_all(calls, self.cfg.start_timeout_s)
        bad = {r: res for r, res in results.items() if isinstance(res, Exception)}
        if bad:
            raise RuntimeError(f"loading experts {experts} into group {group_id} failed on {bad}")

    async def drain(self, group_id: int | None = None, replica_id: str | None = None) -> list[str]:
        """Take a replica (or a whole group) out of service without failing a request; returns the drained ids.

        Draining a group's last replica drains the group: the experts only it holds move to the others first.
        """
        if (group_id is None) == (replica_id is None):
            raise PlacementError("drain: give exactly one of group_id or replica_id")
        async with self._lock:
            if replica_id is not None:
                group_id = self.placement.group_of_replica(replica_id)
                if len(self.placement.replicas_of(group_id)) > 1:
                    leaving = [replica_id]
                    await self._bump(self.placement.without_replica(replica_id))
                    epoch = self.placement.epoch
                else:
                    leaving, epoch = await self._remove_group(group_id)
            else:
                leaving, epoch = await self._remove_group(group_id)
            for r in leaving:
                self.records[r].state = DRAINING
        await self._retire(leaving, epoch)
        return leaving

    async def _remove_group(self, group_id: int) -> tuple[list[str], int]:  # holds self._lock
        moves = reassign_experts(self.placement, group_id, await self._expert_load())
        placement = self.placement
        for gid in sorted({g for _, g in moves}):
            experts = [e for e, g in moves if g == gid]
            await self._load_into_group(gid, experts)
            for e in experts:
                placement = placement.with_expert(gid, e)
        leaving = list(placement.replicas_of(group_id))
        await self._bump(placement.without_group(group_id))
        return leaving, self.placement.epoch

    async def _retire(self, replica_ids: list[str], epoch: int) -> None:
        """Once dispatchers route with `epoch`, let each replica finish what it holds, then stop it."""
        await self._wait_acks(epoch, self.cfg.drain_timeout_s)
        recs = [self.records[r] for r in replica_ids]
        calls = {rec.replica_id: rec.handle.drain.remote(self.cfg.drain_timeout_s) for rec in recs if rec.handle}
        await call_all(calls, self.cfg.drain_timeout_s + 5.0)
        for rec in recs:
            kill_replica(rec)
            self.records.pop(rec.replica_id, None)
        self._persist()

    # --- the autoscaler lease ------------------------------------------------------------------------------
    @_retried_read
    async def lease_autoscaler(self, owner: str, ttl_s: float) -> str:
        """One autoscaler acts on this cluster at a time: `owner` holds (or takes, when free or expired) the
        lease for `ttl_s` more seconds. Returns the holder after the call (`owner` when it may act).

        Several edges with an autoscaling policy each (the Helm chart's trunk pods) would otherwise act
        on the same groups with different views. A restarted controller forgets the lease; the next
        runner to ask takes it.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl_s}")
        now = time.monotonic()
        holder = self._autoscaler_lease
        if holder is None or holder[0] == owner or holder[1] <= now:
            self._autoscaler_lease = (owner, now + ttl_s)
        return self._autoscaler_lease[0]

    @_retried_read
    async def release_autoscaler(self, owner: str) -> None:
        """Give the lease up at once (a runner that stops), if `owner` holds it."""
        if self._autoscaler_lease is not None and self._autoscaler_lease[0] == owner:
            self._autoscaler_lease = None

    # --- reading ----------------------------------------------------------------------------------------------
    @_retried_read
    async def epoch(self) -> int:
        return self.placement.epoch

    @_retried_read
    async def status(self) -> dict:
        """Groups, replicas, experts held, per-expert load over the window, the epoch, and the live dispatchers."""
        self._ensure_background()
        self._prune_dispatchers()
        stats = await self._collect_stats()
        groups = []
        for g in self.placement.groups:
            reps = []
            for rid, rec in sorted(self.records.items()):
                if rec.group_id != g.group_id:
                    continue
                s = stats.get(rid)
                s = s if isinstance(s, dict) else {}
                reps.append({
                    "replica_id": rid, "state": rec.state, "incarnation": rec.incarnation,
                    "serving": rid in self.placement.replicas_of(g.group_id),
                    "node_id": rec.info.get("node_id", ""), "device": rec.info.get("device", ""),
                    "pid": rec.info.get("pid", 0), "busy_share": s.get("busy_share", 0.0),
                    "rows": s.get("rows", 0), "restarts": len(rec.restarts), "channels": s.get("channels", 0),
                })
            groups.append({"group_id": g.group_id, "experts": list(g.experts), "replicas": reps})
        by_layer: dict[int, dict[int, int]] = {}
        for s in stats.values():
            if isinstance(s, dict):
                for layer, per_expert in s["per_layer"].items():
                    dest = by_layer.setdefault(int(layer), {})
                    for e, n in per_expert.items():
                        dest[e] = dest.get(e, 0) + n
        total: dict[int, int] = {}
        for per_expert in by_layer.values():
            for e, n in per_expert.items():
                total[e] = total.get(e, 0) + n
        return {
            "cluster": self.cfg.name, "epoch": self.placement.epoch, "num_experts": self.cfg.num_experts,
            "window_s": self.cfg.load_window_s, "groups": groups, "expert_load": total, "expert_load_by_layer": by_layer,
            "unavailable_experts": self.placement.uncovered_experts() if self.placement.groups else [],
            "dispatchers": len(self._acks),
        }


ExpertControllerActor = ray.remote(ExpertController)


def start_controller(config: ControllerConfig, *, start: bool = True, timeout_s: float | None = None):
    """Create (or reattach to) the cluster's controller actor and start its groups; returns the handle."""
    handle = ExpertControllerActor.options(
        name=config.actor_name, namespace=config.namespace, get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_task_retries=0, max_concurrency=1000,
    ).remote(config)
    if start:
        ray.get(handle.start.remote(), timeout=timeout_s or config.start_timeout_s + 60.0)
    return handle
