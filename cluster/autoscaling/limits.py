"""Bounds, delays, cool-down and step, written once and wrapped around any policy.

Semantics (those of the Kubernetes HPA's stabilisation windows, per unit):
- the policy's wish is first clamped to [min_replicas, max_replicas];
- scale up only when every wish over the last `upscale_delay_s` asked for more, and then to the
  smallest of those wishes; scale down only when every wish over the last `downscale_delay_s`
  asked for less, and then to the largest of them (a short dip never removes capacity);
- no change within `cooldown_s` of the unit's previous change;
- at most `max_step_up` / `max_step_down` replicas per decision;
- a unit outside its bounds (the bounds changed) is brought back at once, ignoring delays.
Every target's reason says what the policy wanted and which limit, if any, held it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import AutoscalingConfig, Bounds
from .decisions import TRUNK, Decision, ScaleTarget
from .policy import PolicyContext, PolicyFn, PolicyState, run_policy
from .signals import Signals

_EPS = 1e-9


def with_limits(policy: PolicyFn, name: str = "policy") -> PolicyFn:
    """Wrap `policy` so its decisions honour config.limits and config.redundant_experts.

    The wrapped policy keeps its own state under "policy" and the limits' under "limits".
    """

    def limited(ctx: PolicyContext) -> tuple[Decision, dict[str, Any]]:
        inner = PolicyContext(ctx.signals, ctx.config, ctx.state.get("policy", {}))
        wish, policy_state = run_policy(policy, inner, name)
        decision, limits_state = apply_limits(wish, ctx.signals, ctx.config, ctx.state.get("limits", {}))
        return decision, {"policy": policy_state, "limits": limits_state}

    limited.__name__ = f"limited_{getattr(policy, '__name__', 'policy')}"
    limited.__wrapped__ = policy  # type: ignore[attr-defined]
    return limited


def apply_limits(
    wish: Decision, signals: Signals, config: AutoscalingConfig, state: PolicyState
) -> tuple[Decision, dict[str, Any]]:
    """Turn the policy's wish into the decision the controller carries out (pure)."""
    now = signals.now_s
    limits = config.limits
    current = {TRUNK: signals.trunk.target, **{n: g.target for n, g in signals.groups.items()}}
    new_state: dict[str, Any] = {}
    targets: dict[str, ScaleTarget] = {}
    for unit, target in wish.targets().items():
        targets[unit], new_state[unit] = _limit_unit(
            unit, target, current[unit], limits.bounds(unit), config, state.get(unit, {}), now
        )
    redundant, reason, new_state["redundant"] = _limit_redundant(wish, signals, config, state.get("redundant", {}))
    decision = Decision(
        trunk=targets.pop(TRUNK), groups=targets, redundant=redundant, redundant_reason=reason
    )
    return decision, new_state


def _wishes_over(history: list[list[float]], now: float, delay: float) -> list[int] | None:
    """Wishes in force over [now - delay, now]; None while the history does not reach back that far."""
    if delay <= _EPS:
        return [int(history[-1][1])]
    start = now - delay
    before = [h for h in history if h[0] <= start + _EPS]
    if not before:
        return None
    return [int(before[-1][1])] + [int(h[1]) for h in history if h[0] > start + _EPS]


def _prune(history: list[list[float]], now: float, horizon: float) -> list[list[float]]:
    """Keep what covers [now - horizon, now]: the entries inside and the one in force at its start."""
    start = now - horizon
    before = [h for h in history if h[0] <= start + _EPS]
    return before[-1:] + [h for h in history if h[0] > start + _EPS]


def _limit_unit(
    unit: str,
    target: ScaleTarget,
    current: int,
    bounds: Bounds,
    config: AutoscalingConfig,
    state: Mapping[str, Any],
    now: float,
) -> tuple[ScaleTarget, dict[str, Any]]:
    limits = config.limits
    wish = bounds.clamp(target.replicas)
    reason = target.reason
    if wish != target.replicas:
        reason += f" (policy wanted {target.replicas}; bounds {bounds.min_replicas}..{bounds.max_replicas})"
    last_change = state.get("last_change")
    history = [list(h) for h in state.get("history", []) if h[0] < now - _EPS] + [[now, wish]]
    history = _prune(history, now, max(limits.upscale_delay_s, limits.downscale_delay_s))

    if current != bounds.clamp(current):
        fixed = bounds.clamp(current)
        why = f"{current} is outside bounds {bounds.min_replicas}..{bounds.max_replicas}; corrected at once"
        return ScaleTarget(fixed, why), {"history": history, "last_change": now}

    out = current
    if wish > current:
        wishes = _wishes_over(history, now, limits.upscale_delay_s)
        if wishes is None or min(wishes) <= current:
            reason += f"; held: wanted more for less than upscale_delay_s={limits.upscale_delay_s:g}s"
        else:
            out = min(wishes)
    elif wish < current:
        wishes = _wishes_over(history, now, limits.downscale_delay_s)
        if wishes is None or max(wishes) >= current:
            reason += f"; held: wanted fewer for less than downscale_delay_s={limits.downscale_delay_s:g}s"
        else:
            out = max(wishes)
    if out != current and last_change is not None and now - last_change < limits.cooldown_s - _EPS:
        reason += f"; held: cool-down, last change {now - last_change:.0f}s ago < cooldown_s={limits.cooldown_s:g}s"
        out = current
    if out > current + limits.max_step_up:
        out = current + limits.max_step_up
        reason += f"; step capped at max_step_up={limits.max_step_up}"
    elif out < current - limits.max_step_down:
        out = current - limits.max_step_down
        reason += f"; step capped at max_step_down={limits.max_step_down}"
    new_state = {"history": history, "last_change": now if out != current else last_change}
    return ScaleTarget(out, reason), new_state


def _limit_redundant(
    wish: Decision, signals: Signals, config: AutoscalingConfig, state: Mapping[str, Any]
) -> tuple[dict[int, int], str, dict[str, Any]]:
    rcfg = config.redundant_experts
    current = dict(signals.redundant)
    if not rcfg.enabled:
        if current:
            return {}, "redundant_experts.enabled is false; copies removed", {"last_change": signals.now_s}
        return {}, "redundant_experts.enabled is false", dict(state)
    wanted = {e: min(c, rcfg.max_per_expert) for e, c in wish.redundant.items() if c > 0}
    reason = wish.redundant_reason
    if any(c > rcfg.max_per_expert for c in wish.redundant.values()):
        reason += f" (capped at max_per_expert={rcfg.max_per_expert})"
    # Keep the policy's order (hottest first) when trimming to the total budget.
    out: dict[int, int] = {}
    budget = rcfg.max_total
    for expert, copies in wanted.items():
        take = min(copies, budget)
        if take > 0:
            out[expert] = take
            budget -= take
    if sum(wanted.values()) > sum(out.values()):
        reason += f" (trimmed to max_total={rcfg.max_total})"
    last_change = state.get("last_change")
    if out != current and last_change is not None and signals.now_s - last_change < config.limits.cooldown_s - _EPS:
        return current, reason + "; held: cool-down", dict(state)
    if out != current:
        return out, reason, {"last_change": signals.now_s}
    return out, reason, dict(state)
