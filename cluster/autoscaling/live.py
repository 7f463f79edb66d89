"""Signals from a live cluster: the controller's status and the trunk's engine stats, as a `Signals` snapshot.

Pure: the runner does the I/O (controller.status(), engine.stats(), the telemetry's histograms) and
hands the dicts and readings in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..serving_status import bucket_quantile, histogram_delta
from .signals import GroupSignals, LatencySummary, Signals

STARTING_STATES = ("starting",)  # cluster/replicas.py: a replica asked for, its actor not yet ready


def group_name(group_id: int) -> str:
    """The name policies and limits use for an expert group (`limits.groups.g0`)."""
    return f"g{group_id}"


def group_id_of(name: str) -> int:
    if not (name.startswith("g") and name[1:].isdigit()):
        raise ValueError(f"group: {name!r} is not an expert group name; expected g<id>, e.g. g0")
    return int(name[1:])


@dataclass(frozen=True, slots=True)
class TrunkSnapshot:
    """What the trunk workers report: their count, batch slots, the queue and recent latencies."""

    replicas: int = 1
    pending: int = 0
    busy: float = 0.0
    queue_depth: int = 0
    oldest_wait_s: float = 0.0
    running_sequences: int = 0
    sequence_capacity: int = 0
    queue_wait: LatencySummary = LatencySummary()  # arrival to first schedule, over the window
    ttft: LatencySummary = LatencySummary()  # time to first token, over the window
    tpot: LatencySummary = LatencySummary()  # mean time per output token of requests, over the window
    arrivals_per_s: float = 0.0


# Telemetry's histograms (cluster/telemetry.py) behind the latency fields of a TrunkSnapshot.
LATENCY_HISTOGRAMS = {"queue_wait": "queue_wait_seconds", "ttft": "ttft_seconds", "tpot": "tpot_seconds"}


@dataclass(frozen=True, slots=True)
class EngineReading:
    """One reading of the edge at `t` (monotonic seconds): its engine's stats() and telemetry histograms."""

    t: float
    stats: Mapping[str, float]
    histograms: Mapping[str, Any] = field(default_factory=dict)  # metric name -> telemetry.HistogramData


def trunk_from_engine_stats(stats: Mapping[str, float], max_num_seqs: int, replicas: int = 1) -> TrunkSnapshot:
    """A trunk snapshot from `LLMEngine.stats()` of one worker (the queue and batch slots now)."""
    return TrunkSnapshot(
        replicas=replicas,
        queue_depth=int(stats.get("waiting", 0)),
        oldest_wait_s=float(stats.get("oldest_wait_s", 0.0)),
        running_sequences=int(stats.get("running", 0)),
        sequence_capacity=max_num_seqs * replicas,
    )


def latency_from_buckets(bounds: Sequence[float], counts: Sequence[int]) -> LatencySummary:
    """Quantiles of a bucketed distribution, linear within a bucket (as Prometheus' histogram_quantile).

    `max_s` is the upper bound of the highest bucket in use (the largest finite bound for +Inf).
    """
    n = sum(counts)
    if n <= 0:
        return LatencySummary()
    top = max(i for i, c in enumerate(counts) if c > 0)
    max_s = float(bounds[min(top, len(bounds) - 1)]) if bounds else 0.0
    p50, p95, p99 = (bucket_quantile(q, bounds, counts) for q in (0.5, 0.95, 0.99))
    return LatencySummary(int(n), p50, p95, p99, max_s)


def trunk_from_readings(base: EngineReading, now: EngineReading, max_num_seqs: int, replicas: int = 1) -> TrunkSnapshot:
    """A trunk snapshot over the window from `base` to `now`: the queue and slots as of `now`, arrivals
    per second from the engine's `requests_added` counter, the busy share from its `busy_us`, latency
    quantiles from the histogram deltas."""
    span = now.t - base.t
    # A restarted trunk worker starts its counters again: never a negative rate.
    arrived = max(0.0, float(now.stats.get("requests_added", 0)) - float(base.stats.get("requests_added", 0)))
    latencies = {
        name: latency_from_buckets(*histogram_delta(base.histograms.get(m), now.histograms.get(m))[:2])
        for name, m in LATENCY_HISTOGRAMS.items()
    }
    # Busy share: step time less the waits for expert groups (LLMEngine's busy_us), per replica.
    busy_s = max(0.0, float(now.stats.get("busy_us", 0)) - float(base.stats.get("busy_us", 0))) / 1e6
    busy = min(1.0, busy_s / (span * max(1, replicas))) if span > 0 else 0.0
    return replace(trunk_from_engine_stats(now.stats, max_num_seqs, replicas),
                   arrivals_per_s=arrived / span if span > 0 else 0.0, busy=busy, **latencies)


def redundant_copies(groups: Sequence[Mapping]) -> dict[int, int]:
    """Extra homes per logical expert: the number of groups holding it, minus one."""
    holders: dict[int, int] = {}
    for g in groups:
        for e in g["experts"]:
            holders[int(e)] = holders.get(int(e), 0) + 1
    return {e: n - 1 for e, n in holders.items() if n > 1}


def expert_load_matrix(by_layer: Mapping, num_experts: int) -> tuple[tuple[float, ...], ...]:
    """[layer][expert] token rows from the controller's `expert_load_by_layer`, layers in order."""
    rows = []
    for layer in sorted(by_layer, key=int):
        per_expert = by_layer[layer]
        rows.append(tuple(float(per_expert.get(e, per_expert.get(str(e), 0))) for e in range(num_experts)))
    return tuple(rows)


def group_busy_shares(status: Mapping) -> dict[str, float]:
    """Each group's busy share by name, from `ExpertController.status()`: the mean over its serving
    replicas (at most 1; 0 with none serving). Starting and draining replicas do not count."""
    shares = {}
    for g in status["groups"]:
        serving = [float(r["busy_share"]) for r in g["replicas"] if r["serving"]]
        shares[group_name(int(g["group_id"]))] = min(1.0, sum(serving) / len(serving)) if serving else 0.0
    return shares


def signals_from_status(status: Mapping, now_s: float, window_s: float, trunk: TrunkSnapshot | None = None) -> Signals:
    """One `Signals` snapshot from `ExpertController.status()` and the trunk's report."""
    trunk = trunk or TrunkSnapshot()
    busy = group_busy_shares(status)
    groups: dict[str, GroupSignals] = {}
    for g in status["groups"]:
        name = group_name(int(g["group_id"]))
        serving = [r for r in g["replicas"] if r["serving"]]
        starting = [r for r in g["replicas"] if not r["serving"] and r["state"] in STARTING_STATES]
        groups[name] = GroupSignals(
            replicas=len(serving), pending=len(starting), busy=busy[name], experts=tuple(int(e) for e in g["experts"])
        )
    return Signals(
        now_s=now_s,
        window_s=window_s,
        trunk=GroupSignals(trunk.replicas, trunk.pending, trunk.busy),
        groups=groups,
        queue_depth=trunk.queue_depth,
        oldest_wait_s=trunk.oldest_wait_s,
        queue_wait=trunk.queue_wait,
        ttft=trunk.ttft,
        tpot=trunk.tpot,
        arrivals_per_s=trunk.arrivals_per_s,
        running_sequences=trunk.running_sequences,
        sequence_capacity=trunk.sequence_capacity,
        expert_load=expert_load_matrix(status.get("expert_load_by_layer", {}), int(status["num_experts"])),
        redundant=redundant_copies(status["groups"]),
    )
