"""Placement of experts on groups and replicas: pure logic, no Ray."""

from __future__ import annotations

import pytest

from moeserve.cluster.placement import (GroupSpec, Placement, PlacementError, assign_targets, contiguous_groups,
                                        group_for_extra_replica, group_load, reassign_experts)


def _placement(num_experts=8, num_groups=2, replicas=1) -> Placement:
    groups = contiguous_groups(num_experts, num_groups)
    reps = tuple((g.group_id, tuple(f"g{g.group_id}r{i}" for i in range(replicas))) for g in groups)
    return Placement(num_experts, groups, reps, epoch=1)


def test_contiguous_groups_cover_every_expert_once():
    groups = contiguous_groups(10, 4)
    assert [g.experts for g in groups] == [(0, 1, 2), (3, 4, 5), (6, 7), (8, 9)]
    with pytest.raises(PlacementError, match="num_groups"):
        contiguous_groups(4, 5)
    with pytest.raises(PlacementError, match="num_groups"):
        contiguous_groups(4, 0)


def test_invalid_placements_name_the_problem():
    with pytest.raises(PlacementError, match="distinct"):
        GroupSpec(0, (1, 1))
    with pytest.raises(PlacementError, match="outside 0..3"):
        Placement(4, (GroupSpec(0, (0, 4)),))
    with pytest.raises(PlacementError, match="duplicate group"):
        Placement(4, (GroupSpec(0, (0,)), GroupSpec(0, (1,))))
    with pytest.raises(PlacementError, match="serves twice"):
        Placement(4, (GroupSpec(0, (0, 1)), GroupSpec(1, (2, 3))), ((0, ("a",)), (1, ("a",))))
    with pytest.raises(PlacementError, match="not placed"):
        Placement(4, (GroupSpec(0, (0, 1, 2, 3)),), ((1, ("a",)),))


def test_routes_list_every_replica_with_the_local_id():
    p = _placement(8, 2, replicas=2).with_expert(1, 2)
    assert [(t.replica_id, t.local_id) for t in p.routes(2)] == [("g0r0", 2), ("g0r1", 2), ("g1r0", 4), ("g1r1", 4)]
    assert [(t.replica_id, t.local_id) for t in p.routes(5)] == [("g1r0", 1), ("g1r1", 1)]
    assert p.uncovered_experts() == []
    assert p.without_replica("g0r0").without_replica("g0r1").uncovered_experts() == [0, 1, 3]


def test_changes_return_new_placements_and_validate():
    p = _placement()
    q = p.with_replica(0, "g0r1")
    assert p.replicas_of(0) == ("g0r0",) and q.replicas_of(0) == ("g0r0", "g0r1")
    with pytest.raises(PlacementError, match="already serves"):
        q.with_replica(1, "g0r1")
    with pytest.raises(PlacementError, match="already holds expert 1"):
        p.with_expert(0, 1)
    with pytest.raises(PlacementError, match="outside 0..7"):
        p.with_expert(0, 9)
    with pytest.raises(PlacementError, match="group 5 is not placed"):
        p.with_replica(5, "x")
    gone = p.with_expert(0, 5).without_group(1)
    assert [g.group_id for g in gone.groups] == [0] and gone.all_replicas() == ("g0r0",)
    assert gone.uncovered_experts() == [4, 6, 7]


def test_assign_targets_keeps_each_expert_on_one_replica_and_balances():
    p = _placement(4, 1, replicas=2)
    rows = {0: 10, 1: 9, 2: 2, 3: 1}
    targets, missing = assign_targets(p, rows)
    assert missing == []
    load = {}
    for e, t in targets.items():
        load[t.replica_id] = load.get(t.replica_id, 0) + rows[e]
    assert sorted(load.values()) == [11, 11]  # greedy heaviest-first: 10+1 and 9+2
    assert assign_targets(p, rows) == (targets, [])  # deterministic


def test_assign_targets_excludes_failed_replicas_and_reports_unreachable():
    p = _placement(4, 2, replicas=2)
    targets, missing = assign_targets(p, {0: 3, 2: 3}, exclude={"g0r0", "g0r1", "g1r0"})
    assert missing == [0] and targets[2].replica_id == "g1r1"


def test_assign_targets_salt_rotates_ties():
    p = _placement(2, 1, replicas=2)
    chosen = {assign_targets(p, {0: 4}, salt=s)[0][0].replica_id for s in range(4)}
    assert chosen == {"g0r0", "g0r1"}


def test_extra_replica_goes_to_least_loaded_group_without_the_expert():
    p = _placement(6, 3)
    load = {0: 100.0, 2: 5.0, 3: 50.0, 4: 1.0}
    assert group_load(p, load) == {0: 100.0, 1: 55.0, 2: 1.0}
    assert group_for_extra_replica(p, 0, load) == 2
    assert group_for_extra_replica(p, 4, load) == 1
    single = _placement(2, 1)
    with pytest.raises(PlacementError, match="every serving group holds it"):
        group_for_extra_replica(single, 0, {})


def test_reassign_moves_only_orphans_heaviest_first():
    p = _placement(7, 3).with_expert(1, 0)  # groups (0, 1, 2), (3, 4, 0), (5, 6)
    # Expert 0 has another home; 1 is heavier than 2; group 1 carries half of expert 0's load.
    assert reassign_experts(p, 0, {1: 9.0, 0: 50.0, 2: 1.0}) == [(1, 2), (2, 2)]
    assert reassign_experts(p, 0, {1: 9.0, 0: 50.0, 2: 1.0, 5: 30.0}) == [(1, 1), (2, 2)]
    with pytest.raises(PlacementError, match="last serving group"):
        reassign_experts(_placement(2, 1), 0, {})
