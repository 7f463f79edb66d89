"""Signals from a live cluster: the controller's status and the trunk's engine stats, as a `Signals` snapshot.

Pure: the runner does the I/O (controller.status(), engine.stats()) and hands the dicts in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    ttft_s: Sequence[float] = field(default_factory=tuple)  # first tokens observed in the window
    tpot_s: Sequence[float] = field(default_factory=tuple)  # finished requests in the window
    arrivals_per_s: float = 0.0


def trunk_from_engine_stats(stats: Mapping[str, int], max_num_seqs: int, replicas: int = 1) -> TrunkSnapshot:
    """A trunk snapshot from `LLMEngine.stats()` of one worker (queue and batch slots only)."""
    return TrunkSnapshot(
        replicas=replicas,
        queue_depth=int(stats.get("waiting", 0)),
        running_sequences=int(stats.get("running", 0)),
        sequence_capacity=max_num_seqs * replicas,
    )


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


def signals_from_status(status: Mapping, now_s: float, window_s: float, trunk: TrunkSnapshot | None = None) -> Signals:
    """One `Signals` snapshot from `ExpertController.status()` and the trunk's report."""
    trunk = trunk or TrunkSnapshot()
    groups: dict[str, GroupSignals] = {}
    for g in status["groups"]:
        serving = [r for r in g["replicas"] if r["serving"]]
        starting = [r for r in g["replicas"] if not r["serving"] and r["state"] in STARTING_STATES]
        busy = sum(float(r["busy_share"]) for r in serving) / len(serving) if serving else 0.0
        groups[group_name(int(g["group_id"]))] = GroupSignals(
            replicas=len(serving), pending=len(starting), busy=min(1.0, busy), experts=tuple(int(e) for e in g["experts"])
        )
    return Signals(
        now_s=now_s,
        window_s=window_s,
        trunk=GroupSignals(trunk.replicas, trunk.pending, trunk.busy),
        groups=groups,
        queue_depth=trunk.queue_depth,
        oldest_wait_s=trunk.oldest_wait_s,
        ttft=LatencySummary.of(trunk.ttft_s),
        tpot=LatencySummary.of(trunk.tpot_s),
        arrivals_per_s=trunk.arrivals_per_s,
        running_sequences=trunk.running_sequences,
        sequence_capacity=trunk.sequence_capacity,
        expert_load=expert_load_matrix(status.get("expert_load_by_layer", {}), int(status["num_experts"])),
        redundant=redundant_copies(status["groups"]),
    )
