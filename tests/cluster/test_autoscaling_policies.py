"""The built-in policies as pure functions: signals snapshot + config + state -> decision + state."""

from __future__ import annotations

import itertools

from moeserve.cluster.autoscaling import GroupSignals, LatencySummary, Signals, parse_config
from moeserve.cluster.autoscaling.policies.common import hot_experts, proportional
from moeserve.cluster.autoscaling.policies.slo import slo
from moeserve.cluster.autoscaling.policies.target_utilisation import target_utilisation
from moeserve.cluster.autoscaling.policy import PolicyContext, run_policy


def _signals(**kw) -> Signals:
    base = dict(
        now_s=100.0,
        window_s=60.0,
        trunk=GroupSignals(2, busy=0.3),
        groups={"g0": GroupSignals(2, busy=0.3, experts=(0, 1)), "g1": GroupSignals(2, busy=0.3, experts=(2, 3))},
        running_sequences=10,
        sequence_capacity=100,
    )
    base.update(kw)
    return Signals(**base)


def test_proportional_exhaustive():
    for ready, util10, target10 in itertools.product(range(1, 9), range(0, 21), range(1, 11)):
        util, target = util10 / 10, target10 / 10
        got = proportional(ready, util, target)
        assert got >= 1
        # Enough replicas to bring utilisation to the target, and one fewer would not be.
        assert ready * util / got <= target + 1e-9
        if got > 1:
            assert ready * util / (got - 1) > target - 1e-9
    assert proportional(3, 0.6, 0.6) == 3
    assert proportional(0, 0.5, 0.5) == 1 and proportional(0, 0.0, 0.5) == 0


def _tu(signals, **params):
    cfg = parse_config({"policy": "target_utilisation", "params": params})
    return run_policy(target_utilisation, PolicyContext(signals, cfg, {}))[0]


def test_target_utilisation_sizes_each_group_to_its_target():
    s = _signals(groups={"g0": GroupSignals(2, busy=0.9, experts=(0, 1)), "g1": GroupSignals(4, busy=0.1, experts=(2, 3))})
    d = _tu(s, expert_busy=0.5)
    assert d.groups["g0"].replicas == 4  # 2 * 0.9 / 0.5 = 3.6 -> 4
    assert d.groups["g1"].replicas == 1  # 4 * 0.1 / 0.5 = 0.8 -> 1
    assert "1.80x target" in d.groups["g0"].reason


def test_target_utilisation_tolerance_band_holds_the_target():
    s = _signals(groups={"g0": GroupSignals(2, pending=1, busy=0.54, experts=(0, 1)), "g1": GroupSignals(2, busy=0.5, experts=(2, 3))})
    d = _tu(s, expert_busy=0.5, tolerance=0.1)
    assert d.groups["g0"].replicas == 3  # within band: keep ready + starting
    assert "within 10%" in d.groups["g0"].reason


def test_target_utilisation_trunk_follows_the_busier_of_busy_and_slots():
    s = _signals(trunk=GroupSignals(2, busy=0.3), running_sequences=150, queue_depth=30, sequence_capacity=200)
    d = _tu(s, trunk_busy=0.6, sequence_slots=0.6)
    assert d.trunk.replicas == 3  # slots (150+30)/200 = 0.9 -> 1.5x over 2 ready


def _slo(signals, state=None, **params):
    cfg = parse_config({"policy": "slo", "slo": {"ttft_s": 1.0, "tpot_s": 0.1, "quantile": "p95"}, "params": params})
    return run_policy(slo, PolicyContext(signals, cfg, state or {}))[0]


def test_slo_grows_the_critical_expert_groups_on_latency_pressure():
    # TPOT p95 0.1 = 2x the setpoint (0.5 x 0.1); g0 is the busiest group and the trunk is idle-ish.
    s = _signals(
        trunk=GroupSignals(1, busy=0.2),
        groups={"g0": GroupSignals(2, busy=0.40, experts=(0, 1)), "g1": GroupSignals(2, busy=0.1, experts=(2, 3))},
        tpot=LatencySummary.of([0.1] * 20),
        ttft=LatencySummary.of([0.2] * 20),
    )
    d = _slo(s, max_factor=2.0)
    assert d.groups["g0"].replicas == 4
    assert "critical path" in d.groups["g0"].reason
    assert d.groups["g1"].replicas == 2  # not on the critical path, headroom is fine
    assert d.trunk.replicas == 1


def test_slo_grows_the_trunk_when_requests_queue():
    s = _signals(
        trunk=GroupSignals(1, busy=0.5),
        running_sequences=100,
        sequence_capacity=100,
        queue_depth=40,
        oldest_wait_s=2.0,
    )
    d = _slo(s)
    assert d.trunk.replicas == 2  # pressure 4x capped at max_factor 2
    assert "queue 40" in d.trunk.reason


def test_slo_scales_down_only_when_calm():
    idle = dict(
        trunk=GroupSignals(3, busy=0.05),
        groups={"g0": GroupSignals(4, busy=0.05, experts=(0, 1)), "g1": GroupSignals(4, busy=0.05, experts=(2, 3))},
        running_sequences=2,
        ttft=LatencySummary.of([0.1] * 5),
        tpot=LatencySummary.of([0.01] * 5),
    )
    d = _slo(_signals(**idle))
    assert d.groups["g0"].replicas == 1 and d.trunk.replicas == 1
    assert "latency calm" in d.groups["g0"].reason
    # Same utilisation but TTFT p95 at 0.4 of the SLO (above calm 0.35): hold.
    warm = dict(idle, ttft=LatencySummary.of([0.4] * 5))
    d = _slo(_signals(**warm))
    assert d.groups["g0"].replicas == 4 and d.trunk.replicas == 3


def test_slo_counts_starting_replicas_as_already_asked_for():
    s = _signals(
        trunk=GroupSignals(1, busy=0.2),
        groups={"g0": GroupSignals(2, pending=2, busy=0.40, experts=(0, 1)), "g1": GroupSignals(2, busy=0.1, experts=(2, 3))},
        tpot=LatencySummary.of([0.1] * 20),
    )
    d = _slo(s)
    assert d.groups["g0"].replicas == 4
    assert "already asked for (2 starting)" in d.groups["g0"].reason


def test_hot_experts_get_copies_hottest_first():
    cfg = parse_config({"policy": "slo", "redundant_experts": {"hot_factor": 2.0}})
    # 4 experts, mean share 0.25, threshold 0.5: expert 0 at 0.6 is hot (one copy), the rest are not.
    s = _signals(expert_load=((60.0, 20.0, 10.0, 10.0), (60.0, 20.0, 10.0, 10.0)))
    extra, why = hot_experts(s, cfg)
    assert extra == {0: 1} and "e0 2.4x" in why
    # Expert 3 at 0.94 of the rows: ceil(0.94/0.5) - 1 = 1 copy; a flat load has no hot expert.
    extra, _ = hot_experts(_signals(expert_load=((2.0, 2.0, 2.0, 94.0),)), cfg)
    assert extra == {3: 1}
    assert hot_experts(_signals(expert_load=((5.0, 5.0, 5.0, 5.0),)), cfg)[0] == {}
    assert hot_experts(_signals(), cfg) == ({}, "no per-expert load observed")


def test_policies_are_pure():
    s = _signals(tpot=LatencySummary.of([0.2] * 10), expert_load=((9.0, 1.0, 1.0, 1.0),))
    for policy in (slo, target_utilisation):
        cfg = parse_config({"policy": policy.__name__})
        first = run_policy(policy, PolicyContext(s, cfg, {}))
        again = run_policy(policy, PolicyContext(s, cfg, {}))
        assert first == again
