"""Signals from the controller's live status (pure: dicts in, a Signals snapshot out)."""

from __future__ import annotations

import pytest

from moeserve.cluster.autoscaling.live import (
    TrunkSnapshot,
    group_id_of,
    signals_from_status,
    trunk_from_engine_stats,
)

STATUS = {
    "num_experts": 4,
    "groups": [
        {"group_id": 0, "experts": [0, 1, 3], "replicas": [
            {"replica_id": "g0r0", "state": "serving", "serving": True, "busy_share": 0.6},
            {"replica_id": "g0r1", "state": "serving", "serving": True, "busy_share": 0.2},
            {"replica_id": "g0r2", "state": "starting", "serving": False, "busy_share": 0.0},
            {"replica_id": "g0r3", "state": "draining", "serving": False, "busy_share": 0.9},
        ]},
        {"group_id": 1, "experts": [2, 3], "replicas": [
            {"replica_id": "g1r0", "state": "serving", "serving": True, "busy_share": 0.1},
        ]},
    ],
    "expert_load_by_layer": {1: {0: 5, 3: 2}, 0: {1: 4, 2: 1}},
}


def test_signals_from_status_counts_serving_and_starting_replicas():
    s = signals_from_status(STATUS, now_s=12.0, window_s=30.0)
    g0, g1 = s.groups["g0"], s.groups["g1"]
    assert (g0.replicas, g0.pending, g0.target) == (2, 1, 3)  # the draining one is leaving
    assert g0.busy == pytest.approx(0.4) and g0.experts == (0, 1, 3)
    assert (g1.replicas, g1.pending, g1.busy) == (1, 0, 0.1)
    assert s.expert_load == ((0.0, 4.0, 1.0, 0.0), (5.0, 0.0, 0.0, 2.0))  # layers in order
    assert s.redundant == {3: 1}  # expert 3 has two homes
    assert s.trunk.replicas == 1 and s.now_s == 12.0


def test_trunk_snapshot_from_engine_stats():
    trunk = trunk_from_engine_stats({"waiting": 3, "running": 5}, max_num_seqs=8, replicas=2)
    s = signals_from_status(STATUS, 0.0, 30.0, trunk)
    assert (s.queue_depth, s.running_sequences, s.sequence_capacity) == (3, 5, 16)
    assert s.sequence_utilisation == pytest.approx(0.5)
    s = signals_from_status(STATUS, 0.0, 30.0, TrunkSnapshot(ttft_s=[0.1, 0.3], tpot_s=[0.02]))
    assert s.ttft.count == 2 and s.tpot.p50_s == pytest.approx(0.02)


def test_group_names():
    assert group_id_of("g12") == 12
    with pytest.raises(ValueError, match="expected g<id>"):
        group_id_of("trunk")
