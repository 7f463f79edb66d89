"""Bounds, delays, cool-down and step around any policy: exhaustive over small grids, plus properties."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.cluster.autoscaling import (
    Autoscaler,
    Decision,
    GroupSignals,
    ScaleTarget,
    Signals,
    apply_limits,
    autoscaling_policy,
    parse_config,
    with_limits,
)
from moeserve.cluster.autoscaling.policy import PolicyContext


def _signals(now: float, g0: int, trunk: int = 1, pending: int = 0, redundant=None) -> Signals:
    return Signals(
        now_s=now,
        window_s=60.0,
        trunk=GroupSignals(trunk),
        groups={"g0": GroupSignals(g0 - pending, pending, experts=(0, 1))},
        redundant=redundant or {},
    )


def _wish(g0: int, trunk: int = 1, redundant=None) -> Decision:
    return Decision(ScaleTarget(trunk, "test"), {"g0": ScaleTarget(g0, "test wish")}, redundant or {})


def _config(**limits):
    return parse_config({"policy": "target_utilisation", "limits": {"expert_groups": {"min_replicas": 1, "max_replicas": 6}, **limits}})


def test_bounds_clamp_every_wish():
    cfg = _config()
    for current, wish in itertools.product(range(1, 7), range(0, 12)):
        out, _ = apply_limits(_wish(wish), _signals(0.0, current), cfg, {})
        assert 1 <= out.groups["g0"].replicas <= 6
        if wish > 6 and current < 6:
            assert "bounds 1..6" in out.groups["g0"].reason


def test_out_of_bounds_unit_is_corrected_at_once():
    cfg = _config(upscale_delay_s=600, downscale_delay_s=600, cooldown_s=600)
    out, _ = apply_limits(_wish(9), _signals(0.0, 9), cfg, {})
    assert out.groups["g0"].replicas == 6
    assert "outside bounds" in out.groups["g0"].reason


def test_step_caps_exhaustive():
    for up, down in itertools.product((1, 2, 3), (1, 2)):
        cfg = _config(max_step_up=up, max_step_down=down, downscale_delay_s=0)
        for current, wish in itertools.product(range(1, 7), range(1, 7)):
            got = apply_limits(_wish(wish), _signals(0.0, current), cfg, {})[0].groups["g0"].replicas
            expected = min(wish, current + up) if wish >= current else max(wish, current - down)
            assert got == expected, (up, down, current, wish)


def _replay(cfg, wishes, start: int, interval: float = 10.0):
    """Feed a sequence of wishes (one per interval) through the limits, moving the cluster each time."""
    state: dict = {}
    current = start
    out = []
    for i, wish in enumerate(wishes):
        decision, state = apply_limits(_wish(wish), _signals(i * interval, current), cfg, state)
        current = decision.groups["g0"].replicas
        out.append(current)
    return out


def test_upscale_delay_needs_every_wish_over_the_window():
    cfg = _config(upscale_delay_s=20, downscale_delay_s=0)
    # Wishes at t=0,10,20,...; the first scale-up is at t=20 (wishes at 0,10,20 all above 2).
    assert _replay(cfg, [4, 4, 4, 4], 2) == [2, 2, 4, 4]
    # A single lull inside the window resets the count.
    assert _replay(cfg, [4, 2, 4, 4, 4], 2) == [2, 2, 2, 2, 4]
    # Scales to the smallest wish in the window, not the latest.
    assert _replay(cfg, [3, 5, 6, 6, 6], 2) == [2, 2, 3, 5, 6]


def test_downscale_delay_goes_to_the_highest_recent_wish():
    cfg = _config(downscale_delay_s=30)
    assert _replay(cfg, [1, 1, 1, 1, 1], 5) == [5, 5, 5, 4, 3]
    cfg = _config(downscale_delay_s=20, max_step_down=6)
    assert _replay(cfg, [3, 1, 2, 1, 1, 1], 5) == [5, 5, 3, 2, 2, 1]


def test_cooldown_holds_changes_after_a_change():
    cfg = _config(cooldown_s=25, downscale_delay_s=0)
    assert _replay(cfg, [3, 4, 5, 6, 6, 1], 2) == [3, 3, 3, 6, 6, 6]


@settings(max_examples=300, deadline=None)
@given(
    wishes=st.lists(st.integers(0, 10), min_size=1, max_size=25),
    start=st.integers(1, 6),
    up=st.integers(1, 3),
    down=st.integers(1, 3),
    up_delay=st.sampled_from([0.0, 10.0, 25.0]),
    down_delay=st.sampled_from([0.0, 10.0, 40.0]),
    cooldown=st.sampled_from([0.0, 15.0, 30.0]),
)
def test_limits_invariants(wishes, start, up, down, up_delay, down_delay, cooldown):
    cfg = _config(max_step_up=up, max_step_down=down, upscale_delay_s=up_delay, downscale_delay_s=down_delay,
                  cooldown_s=cooldown)
    out = _replay(cfg, wishes, start)
    prev, last_change = start, None
    for i, (wish, got) in enumerate(zip(wishes, out)):
        now = i * 10.0
        assert 1 <= got <= 6
        assert -down <= got - prev <= up
        clamped = max(1, min(6, wish))
        # Never moves away from the wish, never overshoots it.
        if got > prev:
            assert got <= clamped
            if up_delay == 0:
                assert got == min(clamped, prev + up)
        if got < prev:
            assert got >= clamped
        if got != prev:
            if last_change is not None:
                assert now - last_change >= cooldown
            last_change = now
        prev = got


def test_with_limits_wraps_a_custom_policy_and_keeps_its_state():
    calls = []

    @autoscaling_policy()
    def always_ten(ctx: PolicyContext):
        calls.append(dict(ctx.state))
        n = ctx.state.get("n", 0) + 1
        return Decision(ScaleTarget(10, "ten"), {"g0": ScaleTarget(10, "ten")}), {"n": n}

    cfg = _config()
    policy = with_limits(always_ten, "always_ten")
    state: dict = {}
    for t in range(3):
        decision, state = policy(PolicyContext(_signals(t * 10.0, 1), cfg, state))
    assert calls == [{}, {"n": 1}, {"n": 2}]
    assert decision.trunk.replicas == cfg.limits.trunk.max_replicas
    assert decision.groups["g0"].replicas == 5  # 1 + max_step_up 4
    assert "max_step_up=4" in decision.groups["g0"].reason


def test_redundant_copies_capped_per_expert_and_in_total():
    cfg = parse_config({"policy": "target_utilisation", "redundant_experts": {"max_per_expert": 2, "max_total": 3}})
    wish = _wish(1, redundant={0: 5, 1: 2})
    out, _ = apply_limits(wish, _signals(0.0, 1), cfg, {})
    assert out.redundant == {0: 2, 1: 1}
    assert "max_per_expert=2" in out.redundant_reason and "max_total=3" in out.redundant_reason
    off = parse_config({"policy": "target_utilisation", "redundant_experts": {"enabled": False}})
    out, _ = apply_limits(wish, _signals(0.0, 1, redundant={0: 1}), off, {})
    assert out.redundant == {}


def test_autoscaler_logs_reasons_for_changes():
    cfg = _config(downscale_delay_s=0)
    auto = Autoscaler(cfg)
    signals = Signals(now_s=0.0, window_s=60.0, trunk=GroupSignals(1, busy=0.3),
                      groups={"g0": GroupSignals(2, busy=0.95, experts=(0, 1))})
    decision = auto.decide(signals)
    assert decision.groups["g0"].replicas == 4
    lines = decision.changes(signals)
    assert lines == ["g0 2 -> 4: busy 0.95 (target 0.5): 1.90x target over 2 ready -> 4"]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_scale_target_rejects_bad_replicas(bad):
    with pytest.raises((TypeError, ValueError), match="replicas"):
        ScaleTarget(bad, "why")
