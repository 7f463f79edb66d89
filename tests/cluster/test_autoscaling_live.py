"""Signals from the controller's live status and the edge's engine (pure: dicts and readings in, a
Signals snapshot out), and `EngineTrunk`, which reads them from an engine and its telemetry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moeserve.cluster.autoscaling.live import (
    EngineReading,
    TrunkSnapshot,
    group_id_of,
    latency_from_buckets,
    signals_from_status,
    trunk_from_engine_stats,
    trunk_from_readings,
)
from moeserve.cluster.autoscaling.signals import LatencySummary

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
    trunk = trunk_from_engine_stats({"waiting": 3, "running": 5, "oldest_wait_s": 1.5}, max_num_seqs=8, replicas=2)
    s = signals_from_status(STATUS, 0.0, 30.0, trunk)
    assert (s.queue_depth, s.running_sequences, s.sequence_capacity, s.oldest_wait_s) == (3, 5, 16, 1.5)
    assert s.sequence_utilisation == pytest.approx(0.5)
    latencies = TrunkSnapshot(ttft=LatencySummary.of([0.1, 0.3]), tpot=LatencySummary.of([0.02]),
                              queue_wait=LatencySummary.of([0.5]))
    s = signals_from_status(STATUS, 0.0, 30.0, latencies)
    assert s.ttft.count == 2 and s.tpot.p50_s == pytest.approx(0.02) and s.queue_wait.max_s == 0.5


BOUNDS = (0.01, 0.1, 1.0)


def test_latency_from_buckets():
    assert latency_from_buckets(BOUNDS, [0, 0, 0, 0]) == LatencySummary()
    lat = latency_from_buckets(BOUNDS, [0, 10, 0, 0])  # ten samples in (0.01, 0.1]
    assert lat.count == 10 and lat.p50_s == pytest.approx(0.055) and lat.p99_s == pytest.approx(0.0991)
    assert lat.max_s == 0.1  # the upper bound of the highest bucket in use
    slow = latency_from_buckets(BOUNDS, [90, 0, 0, 10])  # a tenth beyond the last bound
    assert slow.p50_s < 0.01 and slow.p99_s == slow.max_s == 1.0
    assert slow.quantile("p95") == 1.0


def _hist(counts: list[int]) -> SimpleNamespace:
    """A histogram as Telemetry.histograms() reads it back (cumulative since start)."""
    return SimpleNamespace(bounds=BOUNDS, counts=counts, sum=0.0)


def test_trunk_from_readings_covers_the_window():
    base = EngineReading(100.0, {"waiting": 9, "requests_added": 40},
                         {"ttft_seconds": _hist([5, 0, 0, 0]), "tpot_seconds": _hist([3, 0, 0, 0])})
    now = EngineReading(120.0, {"waiting": 2, "running": 4, "oldest_wait_s": 0.7, "requests_added": 100},
                        {"ttft_seconds": _hist([5, 0, 6, 0]), "tpot_seconds": _hist([3, 2, 0, 0]),
                         "queue_wait_seconds": _hist([0, 4, 0, 0])})
    trunk = trunk_from_readings(base, now, max_num_seqs=8)
    assert (trunk.queue_depth, trunk.running_sequences, trunk.sequence_capacity) == (2, 4, 8)  # as of now
    assert trunk.oldest_wait_s == 0.7 and trunk.arrivals_per_s == pytest.approx(3.0)  # 60 requests in 20 s
    # Only what the window recorded: the five fast TTFTs before it are gone.
    assert trunk.ttft.count == 6 and 0.1 < trunk.ttft.p50_s <= 1.0
    assert trunk.tpot.count == 2 and trunk.tpot.max_s == 0.1
    assert trunk.queue_wait.count == 4  # nothing recorded before the window: all of it counts
    assert (trunk.busy, trunk.replicas) == (0.0, 1)


def test_trunk_from_readings_without_telemetry_or_history():
    only = EngineReading(5.0, {"waiting": 1, "oldest_wait_s": 2.0, "requests_added": 3})
    trunk = trunk_from_readings(only, only, max_num_seqs=4)
    assert trunk.arrivals_per_s == 0.0 and trunk.oldest_wait_s == 2.0  # no time has passed yet
    assert trunk.ttft == trunk.tpot == trunk.queue_wait == LatencySummary()
    restarted = EngineReading(15.0, {"requests_added": 1})  # a restarted trunk worker counts from 0 again
    assert trunk_from_readings(only, restarted, max_num_seqs=4).arrivals_per_s == 0.0


def test_group_names():
    assert group_id_of("g12") == 12
    with pytest.raises(ValueError, match="expected g<id>"):
        group_id_of("trunk")


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_engine_trunk_reports_a_real_engine_over_the_window(demo_model_dir):
    from moeserve.cluster.autoscaling.runner import EngineTrunk
    from moeserve.cluster.telemetry import Telemetry
    from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_num_seqs=1, max_num_batched_tokens=64,
                                                num_kv_blocks=32))
    tel, clock = Telemetry(), _Clock()
    try:
        engine.observer = tel  # queue waits, as AsyncEngine.observe does
        trunk = EngineTrunk(engine, tel, window_s=10.0, clock=clock)
        bare = EngineTrunk(engine, None, window_s=10.0, clock=clock)
        trackers = {}
        for i in range(3):
            trackers[f"r{i}"] = tel.track_request("Generate")
            engine.add_request(f"r{i}", [5, 6, 7, i], SamplingParams(max_tokens=4, ignore_eos=True))
        clock.t = 2.0
        queued = trunk()
        assert (queued.queue_depth, queued.running_sequences, queued.sequence_capacity) == (3, 0, 1)
        assert queued.oldest_wait_s > 0 and queued.arrivals_per_s == pytest.approx(1.5)
        assert queued.ttft.count == 0
        while engine.has_unfinished():
            for out in engine.step():
                trackers[out.request_id].output(out)
        clock.t = 4.0
        done, without = trunk(), bare()
        assert (done.queue_depth, done.oldest_wait_s) == (0, 0.0)
        assert done.ttft.count == done.tpot.count == done.queue_wait.count == 3
        assert 0 < done.ttft.p50_s <= done.ttft.p99_s and done.tpot.p50_s > 0
        # Without telemetry the engine's figures are there, the latencies are not.
        assert without.arrivals_per_s == pytest.approx(0.75) and without.sequence_capacity == 1
        assert without.ttft == without.tpot == without.queue_wait == LatencySummary()
        clock.t = 20.0  # the window has moved past the traffic
        idle = trunk()
        assert idle.arrivals_per_s == 0.0 and idle.ttft.count == 0 and idle.queue_wait.count == 0
    finally:
        tel.shutdown()


def test_trunk_busy_share_from_the_engines_busy_time():
    """busy: the engine's busy_us over the window (step time less waits for expert groups), per replica."""
    base = EngineReading(100.0, {"busy_us": 2_000_000})
    now = EngineReading(110.0, {"busy_us": 7_000_000})
    assert trunk_from_readings(base, now, max_num_seqs=4).busy == pytest.approx(0.5)
    assert trunk_from_readings(base, now, max_num_seqs=4, replicas=2).busy == pytest.approx(0.25)
    assert trunk_from_readings(base, EngineReading(110.0, {"busy_us": 1}), max_num_seqs=4).busy == 0.0
    assert trunk_from_readings(base, EngineReading(100.0, {"busy_us": 9_000_000}), max_num_seqs=4).busy == 0.0
