"""The autoscaler on a live cluster: every `interval_s`, observe, run the policy, carry out its decision.

Observation is the controller's `status()` (replicas, busy share, per-expert load) plus the trunk's
report (`EngineTrunk`: the edge's queue, batch slots, arrivals and latencies); the decision comes from
the same pure, limited policy the simulator replays; the effects go through the controller's
live-scaling path (`scale`, which adds replicas or drains them without failing a request, and
`replicate_expert`). A change runs in the background: the loop never waits for a replica to start
(that may take a new node), and a group with a change in flight gets no second one until the first
is done. Every decision that changes something is logged with its reason.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import ray

from ..serving_status import ReadingWindow
from .autoscaler import Autoscaler
from .config import AutoscalingConfig
from .decisions import Decision
from .live import (LATENCY_HISTOGRAMS, EngineReading, TrunkSnapshot, group_id_of, signals_from_status,
                   trunk_from_readings)
from .signals import Signals

log = logging.getLogger("moeserve.autoscaler")


@dataclass(frozen=True, slots=True)
class ScalingEvent:
    """One line of the autoscaler's log: when, what, and why."""

    at_s: float
    kind: str  # "decision", "done", "failed", "skipped", "lease"
    unit: str
    message: str


class EngineTrunk:
    """The trunk's report from the engine in this process: callable, a TrunkSnapshot over `window_s`.

    From the engine's stats(), always: queue depth, age of the oldest request not yet scheduled,
    running sequences, batch slots (its max_num_seqs) and admitted requests per second. From
    `telemetry` (this process's cluster.telemetry.Telemetry, on with serve --prometheus-port or
    --otlp-endpoint): the queue-wait, TTFT and TPOT quantiles, from its histograms' bucket deltas.
    Without telemetry those stay empty (count 0): a policy sees the queue but no latency. With trunk
    workers (router.trunk_pool.TrunkPool) the replicas and pending counts are the pool's. The busy
    share is the engine's step time less its waits for the expert groups (`busy_us`), over the window
    and per replica.
    """

    def __init__(self, engine, telemetry=None, *, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.engine, self.telemetry, self.clock = engine, telemetry, clock
        self.max_num_seqs = engine.config.max_num_seqs
        self._window = ReadingWindow(self._read(), window_s)

    def _read(self) -> EngineReading:
        histograms = self.telemetry.histograms(*LATENCY_HISTOGRAMS.values()) if self.telemetry is not None else {}
        return EngineReading(self.clock(), self.engine.stats(), histograms)

    def __call__(self) -> TrunkSnapshot:
        now = self._read()
        # A TrunkPool (serve --trunk-workers) says how many workers serve and start; one engine is one.
        replicas, pending = getattr(self.engine, "replicas", 1), getattr(self.engine, "pending", 0)
        return replace(trunk_from_readings(self._window.base(now), now, self.max_num_seqs, replicas), pending=pending)


class AutoscaleRunner:
    """Runs the configured policy against `controller` (an ExpertController actor handle)."""

    def __init__(
        self,
        controller,
        config: AutoscalingConfig,
        *,
        trunk: Callable[[], TrunkSnapshot] | None = None,
        scale_trunk: Callable[[int], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        status_timeout_s: float = 30.0,
    ):
        self.controller = controller
        self.config = config
        self.autoscaler = Autoscaler(config)
        self.trunk = trunk
        self.scale_trunk = scale_trunk
        self.clock = clock
        self.status_timeout_s = status_timeout_s
        self.events: deque[ScalingEvent] = deque(maxlen=1000)
        self._in_flight: dict[str, tuple[ray.ObjectRef, str]] = {}  # unit -> (call, what it was asked)
        self._said: dict[str, str] = {}  # unit -> key of the last repeated message logged
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._asked_lease = False  # asked the controller for its lease since the last stop(): stop releases it
        # This runner's name for the controller's autoscaler lease: one runner acts per cluster.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    def attach_trunk(self, trunk: Callable[[], TrunkSnapshot]) -> None:
        """Read the trunk's report from `trunk` from the next run on. serve attaches its engine's once the
        engine is built: the runner starts beside the expert groups, while the model is still loading."""
        self.trunk = trunk

    # --- one policy run ---------------------------------------------------------------------------
    def observe(self) -> Signals:
        status = ray.get(self.controller.status.remote(), timeout=self.status_timeout_s)
        trunk = self.trunk() if self.trunk else None
        return signals_from_status(status, self.clock(), self.config.window_s, trunk)

    def tick(self) -> Decision | None:
        """Observe, decide, act; returns the decision (None while another runner holds the controller's
        autoscaler lease: this one stands by). Never waits for a change to finish."""
        self._reap()
        if not self._leading():
            return None
        signals = self.observe()
        decision = self.autoscaler.decide(signals)
        self._act(decision, signals)
        return decision

    def _leading(self) -> bool:
        """Hold (or take) the controller's autoscaler lease for three policy periods; say when that changes."""
        ttl = max(3 * self.config.interval_s, 1.0)
        self._asked_lease = True
        holder = ray.get(self.controller.lease_autoscaler.remote(self.owner, ttl), timeout=self.status_timeout_s)
        if holder == self.owner:
            self._once("lease", f"acting on the cluster (autoscaler lease held by {self.owner})", kind="lease")
            return True
        self._once("lease", f"standing by: the autoscaler {holder} acts on this cluster", kind="lease")
        return False

    def _act(self, decision: Decision, signals: Signals) -> None:
        lines = {line.split(" ", 1)[0]: line for line in decision.changes(signals)}
        for name, target in decision.groups.items():
            if target.replicas == signals.groups[name].target:
                continue
            if name in self._in_flight:
                # Said once when the change started; the next run decides again once it is done.
                log.debug("autoscale: %s waits for '%s'", lines[name], self._in_flight[name][1])
                continue
            self._event("decision", name, lines[name])
            ref = self.controller.scale.remote(group_id_of(name), target.replicas)
            self._in_flight[name] = (ref, f"scale {name} to {target.replicas}")
        if decision.trunk.replicas != signals.trunk.target:
            if self.scale_trunk is not None:
                self._event("decision", "trunk", lines["trunk"])
                try:  # the scaler starts or drains workers in the background and says what it set going
                    said = self.scale_trunk(decision.trunk.replicas)
                except Exception as exc:  # noqa: BLE001 - logged; the next run decides again
                    self._event("failed", "trunk", f"scale trunk to {decision.trunk.replicas} failed: {exc!r}",
                                logging.WARNING)
                else:
                    self._event("done", "trunk", said or f"scale trunk to {decision.trunk.replicas} asked")
            else:
                # Said when the target asked for changes, not every run (the reason's figures do).
                self._once("trunk", f"trunk target {decision.trunk.replicas} not carried out: no trunk scaler "
                                    f"attached ({decision.trunk.reason})", key=f"target {decision.trunk.replicas}")
        if "redundant" in lines:
            self._once("redundant", lines["redundant"], kind="decision")
        for expert in sorted(set(decision.redundant) - set(signals.redundant)):
            unit = f"e{expert}"
            if unit not in self._in_flight:
                self._in_flight[unit] = (self.controller.replicate_expert.remote(expert), f"replicate expert {expert}")
        for expert in sorted(set(signals.redundant) - set(decision.redundant)):
            # The controller has no call that removes an extra home yet; the copy stays until a drain.
            self._once(f"e{expert}", f"extra copy of expert {expert} kept: the controller cannot remove one")

    def _reap(self) -> None:
        """Log the changes that finished since the last run."""
        for unit, (ref, what) in list(self._in_flight.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            del self._in_flight[unit]
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a failed change is logged; the next run decides again
                self._event("failed", unit, f"{what} failed: {exc}", logging.WARNING)
            else:
                self._event("done", unit, f"{what} done: {result}")

    def _once(self, unit: str, message: str, kind: str = "skipped", key: str | None = None) -> None:
        """An event that would repeat every run while nothing changes: logged when its key (by default
        the message) first differs."""
        key = message if key is None else key
        if self._said.get(unit) != key:
            self._said[unit] = key
            self._event(kind, unit, message)

    def _event(self, kind: str, unit: str, message: str, level: int = logging.INFO) -> None:
        self.events.append(ScalingEvent(self.clock(), kind, unit, message))
        log.log(level, "autoscale %s: %s", kind, message)

    @property
    def busy(self) -> bool:
        """True while a change is still running."""
        return bool(self._in_flight)

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the policy every interval_s until `stop()` (or until Ray is shut down under it: a call to the
        controller then would start a new local Ray); one failed run is logged, not fatal."""
        while not self._stop.is_set() and ray.is_initialized():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop outlives one bad observation
                log.exception("autoscale: policy run failed")
            self._stop.wait(self.config.interval_s)  # the policy period, not a synchronisation

    def start(self) -> AutoscaleRunner:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="moeserve-autoscaler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the loop and give the autoscaler lease up. Safe to call again (serve also registers it to run
        at exit): a runner already stopped does nothing, and neither does one whose Ray is shut down (a
        call to the controller would start a new local Ray; the lease expires by itself)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
        if not self._asked_lease:  # stopped already (or never asked for the lease): nothing to give up
            return
        self._asked_lease = False
        if not ray.is_initialized():
            return
        try:  # a standby runner takes over at its next run, not after the lease expires
            ray.get(self.controller.release_autoscaler.remote(self.owner), timeout=5.0)
        except Exception:  # noqa: BLE001 - the controller may be gone; the lease then expires by itself
            pass
