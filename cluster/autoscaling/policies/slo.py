"""SLO-driven: hold TTFT and TPOT at a set share of their targets, sized with utilisation headroom.

Per decision and per unit (trunk workers, each expert group):
1. Headroom: the replicas that keep the unit's utilisation under its ceiling (proactive: load
   that grows is met before latency moves).
2. Pressure: the chosen latency quantile over `setpoint x SLO` (and the oldest queued request
   against the TTFT setpoint). Above 1, the unit on the critical path grows by that factor, capped
   at `max_factor`: the trunk when requests queue for batch slots or the trunk phase dominates the
   step, otherwise the expert groups whose busy share is near the largest (every MoE layer waits
   for its slowest group).
3. Scale down only when every latency is below `calm x SLO`, nothing queues, and headroom says
   fewer replicas suffice.
Replicas still starting count as capacity already asked for: pressure is measured against ready
replicas, and a wish at or below the current target (ready + starting) asks for nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..decisions import Decision, ScaleTarget
from ..policy import PolicyContext, autoscaling_policy
from ..schema import spec
from ..signals import GroupSignals
from .common import hot_experts, proportional


@dataclass(frozen=True, slots=True)
class SloParams:
    setpoint: float = spec(0.5, gt=0, le=1, doc="aim the latency quantile at this share of the SLO")
    calm: float = spec(0.35, gt=0, le=1, doc="scale down only while every latency quantile is below this share of the SLO")
    max_factor: float = spec(2.0, gt=1, le=16, doc="largest growth of a unit in one decision from latency pressure")
    trunk_busy_ceiling: float = spec(0.4, gt=0, le=1, doc="plan the trunk to stay below this busy share")
    sequence_ceiling: float = spec(0.7, gt=0, le=1, doc="plan batch slots (queued requests count) to stay below this share")
    expert_busy_ceiling: float = spec(0.8, gt=0, le=1, doc="plan every expert group to stay below this busy share")
    critical_share: float = spec(0.85, gt=0, le=1, doc="groups busier than this share of the busiest group are on the critical path")


def _decide(unit: GroupSignals, headroom: int, pressure: float, cause: str, calm: bool, p: SloParams) -> ScaleTarget:
    target = unit.target
    grow = proportional(unit.replicas, min(pressure, p.max_factor), 1.0) if pressure > 1.0 else 0
    want = max(headroom, grow)
    if want > target:
        why = f"{cause} -> {grow}" if grow >= headroom else f"utilisation headroom -> {headroom}"
        return ScaleTarget(want, why)
    if calm and headroom < target:
        return ScaleTarget(headroom, f"latency calm, utilisation headroom needs {headroom}")
    if pressure > 1.0:
        return ScaleTarget(target, f"{cause}; {target} already asked for ({unit.pending} starting)")
    return ScaleTarget(target, "within SLO setpoint")


@autoscaling_policy(params=SloParams)
def slo(ctx: PolicyContext) -> tuple[Decision, dict]:
    """Grow the unit on the critical path while the SLO quantile is above the setpoint; shrink when calm."""
    s, p, target = ctx.signals, ctx.params, ctx.config.slo
    q = target.quantile
    ttft, tpot = s.ttft.quantile(q), s.tpot.quantile(q)
    p_ttft = ttft / (p.setpoint * target.ttft_s)
    p_tpot = tpot / (p.setpoint * target.tpot_s)
    p_queue = s.oldest_wait_s / (p.setpoint * target.ttft_s)
    latency = max(p_ttft, p_tpot)
    calm = (
        s.queue_depth == 0
        and ttft < p.calm * target.ttft_s
        and tpot < p.calm * target.tpot_s
        and s.oldest_wait_s < p.calm * target.ttft_s
    )
    slots = s.sequence_utilisation / p.sequence_ceiling
    group_busy = max((g.busy for g in s.groups.values()), default=0.0)
    trunk_bound = s.trunk.busy >= group_busy
    queued = s.queue_depth > 0 and (p_queue > 1.0 or slots > 1.0)

    # Trunk: batch slots and prefill live here; it also owns the step when its phase dominates.
    trunk_pressure = max(p_queue if queued else 0.0, slots if queued else 0.0, latency if trunk_bound else 0.0)
    cause = (
        f"{q} TTFT {ttft:.2f}s / TPOT {tpot * 1000:.0f}ms vs setpoint {p.setpoint:g}x SLO; "
        f"queue {s.queue_depth} (oldest {s.oldest_wait_s:.1f}s), slots {s.sequence_utilisation:.2f}"
    )
    trunk_headroom = max(
        proportional(s.trunk.replicas, s.trunk.busy / p.trunk_busy_ceiling, 1.0),
        proportional(s.trunk.replicas, s.sequence_utilisation / p.sequence_ceiling, 1.0),
    )
    trunk = _decide(s.trunk, trunk_headroom, trunk_pressure, cause, calm, p)

    groups = {}
    for name, g in s.groups.items():
        critical = group_busy > 0 and g.busy >= p.critical_share * group_busy and not trunk_bound
        pressure = latency if critical else 0.0
        headroom = proportional(g.replicas, g.busy / p.expert_busy_ceiling, 1.0)
        groups[name] = _decide(g, headroom, pressure, f"{cause}; busy {g.busy:.2f} on the critical path", calm, p)

    redundant, why = hot_experts(s, ctx.config)
    return Decision(trunk, groups, redundant, why), {}
