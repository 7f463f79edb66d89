"""Placement of routed experts on expert groups and of groups on replicas: pure data and functions.

A *group* is a set of logical experts (for every MoE layer); its position in `GroupSpec.experts` is
the expert's local id in that group's weight stack. A *replica* is one running copy of a group (one
Ray actor). A logical expert may live in several groups (a hot expert given an extra replica), and a
group may run several replicas. The controller owns a `Placement`; the dispatcher only reads one.
Nothing here touches Ray, a clock or a device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class PlacementError(ValueError):
    """A placement change that would be invalid; the message names what to change."""


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """The logical experts one group holds, in local-id order."""

    group_id: int
    experts: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.group_id < 0:
            raise PlacementError(f"group_id: must be >= 0, got {self.group_id}")
        if len(set(self.experts)) != len(self.experts):
            raise PlacementError(f"group {self.group_id}: experts must be distinct, got {list(self.experts)}")

    def local_id(self, expert: int) -> int:
        return self.experts.index(expert)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one logical expert can run: a replica and the expert's local id in that replica's group."""

    replica_id: str
    group_id: int
    local_id: int


@dataclass(frozen=True, slots=True)
class Placement:
    """Groups, their serving replicas, and the epoch this serving set belongs to."""

    num_experts: int
    groups: tuple[GroupSpec, ...]
    replicas: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (group_id, serving replica ids), by group id
    epoch: int = 0
    _routes: tuple[tuple[Target, ...], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        ids = [g.group_id for g in self.groups]
        if len(set(ids)) != len(ids):
            raise PlacementError(f"groups: duplicate group ids {ids}")
        for g in self.groups:
            bad = [e for e in g.experts if not 0 <= e < self.num_experts]
            if bad:
                raise PlacementError(f"group {g.group_id}: experts {bad} outside 0..{self.num_experts - 1}")
        known = set(ids)
        for gid, _ in self.replicas:
            if gid not in known:
                raise PlacementError(f"replicas: group {gid} is not placed")
        seen: set[str] = set()
        for _, reps in self.replicas:
            for r in reps:
                if r in seen:
                    raise PlacementError(f"replicas: replica {r!r} serves twice")
                seen.add(r)
        routes: list[list[Target]] = [[] for _ in range(self.num_experts)]
        reps_of = dict(self.replicas)
        for g in sorted(self.groups, key=lambda g: g.group_id):
            for rid in reps_of.get(g.group_id, ()):
                for local, e in enumerate(g.experts):
                    routes[e].append(Target(rid, g.group_id, local))
        object.__setattr__(self, "_routes", tuple(tuple(r) for r in routes))

    # --- reading --------------------------------------------------------------------------
    def group(self, group_id: int) -> GroupSpec:
        for g in self.groups:
            if g.group_id == group_id:
                return g
        raise PlacementError(f"group {group_id} is not placed; groups are {[g.group_id for g in self.groups]}")

    def replicas_of(self, group_id: int) -> tuple[str, ...]:
        return dict(self.replicas).get(group_id, ())

    def group_of_replica(self, replica_id: str) -> int:
        for gid, reps in self.replicas:
            if replica_id in reps:
                return gid
        raise PlacementError(f"replica {replica_id!r} is not serving")

    def routes(self, expert: int) -> tuple[Target, ...]:
        """Every (replica, local id) that can run `expert`, in group then replica order."""
        return self._routes[expert]

    def all_replicas(self) -> tuple[str, ...]:
        return tuple(r for _, reps in self.replicas for r in reps)

    def uncovered_experts(self) -> list[int]:
        """Experts with no serving replica anywhere."""
        return [e for e in range(self.num_experts) if not self._routes[e]]

    def groups_holding(self, expert: int) -> list[int]:
        return [g.group_id for g in self.groups if expert in g.experts]

    # --- changing (each returns a new Placement; the epoch is bumped by the caller) ----------
    def _with(self, groups: Iterable[GroupSpec] | None = None, replicas: Mapping[int, tuple[str, ...]] | None = None) -> "Placement":
        groups = tuple(sorted(groups if groups is not None else self.groups, key=lambda g: g.group_id))
        reps = dict(self.replicas) if replicas is None else dict(replicas)
        return Placement(self.num_experts, groups, tuple(sorted((g, tuple(r)) for g, r in reps.items() if r)), self.epoch)

    def with_epoch(self, epoch: int) -> "Placement":
        return Placement(self.num_experts, self.groups, self.replicas, epoch)

    def with_replica(self, group_id: int, replica_id: str) -> "Placement":
        self.group(group_id)
        if replica_id in self.all_replicas():
            raise PlacementError(f"replica {replica_id!r} already serves")
        reps = dict(self.replicas)
        reps[group_id] = tuple(reps.get(group_id, ())) + (replica_id,)
        return self._with(replicas=reps)

    def without_replica(self, replica_id: str) -> "Placement":
        gid = self.group_of_replica(replica_id)
        reps = dict(self.replicas)
        reps[gid] = tuple(r for r in reps[gid] if r != replica_id)
        return self._with(replicas=reps)

    def with_expert(self, group_id: int, expert: int) -> "Placement":
        """`expert` appended to `group_id` (existing local ids stay valid)."""
        g = self.group(group_id)
        if expert in g.experts:
            raise PlacementError(f"group {group_id} already holds expert {expert}")
        if not 0 <= expert < self.num_experts:
            raise PlacementError(f"expert: {expert} outside 0..{self.num_experts - 1}")
        others = [x for x in self.groups if x.group_id != group_id]
        return self._with(groups=[*others, GroupSpec(group_id, g.experts + (expert,))])

    def without_group(self, group_id: int) -> "Placement":
        """The group and all its replicas removed (its experts must be held elsewhere first)."""
        self.group(group_id)
        reps = {g: r for g, r in self.replicas if g != group_id}
        return self._with(groups=[g for g in self.groups if g.group_id != group_id], replicas=reps)


def contiguous_groups(num_experts: int, num_groups: int) -> tuple[GroupSpec, ...]:
    """Split experts 0..E-1 into `num_groups` contiguous, near-equal groups (the first ones one larger)."""
    if num_groups < 1:
        raise PlacementError(f"num_groups: must be >= 1, got {num_groups}")
    if num_groups > num_experts:
        raise PlacementError(f"num_groups: {num_groups} groups for {num_experts} experts; use at most {num_experts}")
    base, extra = divmod(num_experts, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups.append(GroupSpec(g, tuple(range(start, start + size))))
        start += size
    return tuple(groups)


def group_load(placement: Placement, expert_load: Mapping[int, float]) -> dict[int, float]:
    """Load per group: an expert's load shared equally among the groups that hold it."""
    out = {g.group_id: 0.0 for g in placement.groups}
    for e, load in expert_load.items():
        holders = placement.groups_holding(e)
        for gid in holders:
            out[gid] += load / len(holders)
    return out


def group_for_extra_replica(placement: Placement, expert: int, expert_load: Mapping[int, float]) -> int:
    """The least-loaded group that does not hold `expert` yet (ties: fewer experts, then lower id)."""
    load = group_load(placement, expert_load)
    candidates = [g for g in placement.groups if expert not in g.experts and placement.replicas_of(g.group_id)]
    if not candidates:
        raise PlacementError(f"expert {expert}: every serving group holds it already; add a group first")
    best = min(candidates, key=lambda g: (load[g.group_id], len(g.experts), g.group_id))
    return best.group_id


def reassign_experts(placement: Placement, leaving: int, expert_load: Mapping[int, float]) -> list[tuple[int, int]]:
    """(expert, new group) moves so that group `leaving` can go: each expert it alone holds goes to the
    least-loaded remaining group, heaviest experts first (deterministic)."""
    remaining = [g for g in placement.groups if g.group_id != leaving and placement.replicas_of(g.group_id)]
    if not remaining:
        raise PlacementError(f"group {leaving} is the last serving group; add another group before draining it")
    load = group_load(placement, expert_load)
    load = {g.group_id: load[g.group_id] for g in remaining}
    size = {g.group_id: len(g.experts) for g in remaining}
    moves = []
    orphans = [e for e in placement.group(leaving).experts if placement.groups_holding(e) == [leaving]]
    for e in sorted(orphans, key=lambda e: (-expert_load.get(e, 0.0), e)):
        gid = min(load, key=lambda g: (load[g], size[g], g))
        moves.append((e, gid))
        load[gid] += expert_load.get(e, 0.0)
        size[gid] += 1
    return moves


def assign_targets(
    placement: Placement,
    rows_per_expert: Mapping[int, int],
    *,
    exclude: frozenset[str] | set[str] = frozenset(),
    salt: int = 0,
) -> tuple[dict[int, Target], list[int]]:
    """Choose one target per expert with rows, balancing rows across replicas.

    All rows of one expert go to one replica, so each expert runs its rows as one matmul exactly as
    the single-process path does (splitting an expert's rows changes BLAS blocking and so the bits).
    Experts with one choice are placed first; the others, heaviest first, go to the replica with the
    fewest rows so far. Ties rotate with `salt` (e.g. the step and layer) so that equal loads spread
    over time, while the same inputs always give the same answer. Returns (targets, unavailable).
    """
    load: dict[str, int] = {}
    chosen: dict[int, Target] = {}
    unavailable: list[int] = []
    multi: list[tuple[int, tuple[Target, ...]]] = []
    for e in sorted(rows_per_expert):
        options = tuple(t for t in placement.routes(e) if t.replica_id not in exclude)
        if not options:
            unavailable.append(e)
        elif len(options) == 1:
            chosen[e] = options[0]
            load[options[0].replica_id] = load.get(options[0].replica_id, 0) + rows_per_expert[e]
        else:
            multi.append((e, options))
    for e, options in sorted(multi, key=lambda item: (-rows_per_expert[item[0]], item[0])):
        shift = (salt + e) % len(options)
        rotated = options[shift:] + options[:shift]
        best = min(rotated, key=lambda t: load.get(t.replica_id, 0))  # min keeps the first of equals
        chosen[e] = best
        load[best.replica_id] = load.get(best.replica_id, 0) + rows_per_expert[e]
    return chosen, unavailable


@dataclass(frozen=True, slots=True)
class ServingSet:
    """One epoch's placement plus how to reach each replica: what a dispatcher routes against.

    `handles` are transport objects (Ray actor handles, in-process workers); `incarnations` count
    restarts of a replica id, so a failure report names the exact copy that failed.
    """

    placement: Placement
    handles: Mapping[str, object]
    incarnations: Mapping[str, int]

    @property
    def epoch(self) -> int:
        return self.placement.epoch
