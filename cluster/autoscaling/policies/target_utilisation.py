"""Target utilisation: size every unit so its measured busy share sits at a target (the HPA rule)."""

from __future__ import annotations

from dataclasses import dataclass

from ..decisions import Decision, ScaleTarget
from ..policy import PolicyContext, autoscaling_policy
from ..schema import spec
from .common import hot_experts, proportional


@dataclass(frozen=True, slots=True)
class TargetUtilisationParams:
    trunk_busy: float = spec(0.6, gt=0, le=1, doc="target busy share of the trunk workers")
    sequence_slots: float = spec(0.75, gt=0, le=1, doc="target share of batch slots in use (queued requests count)")
    expert_busy: float = spec(0.5, gt=0, le=1, doc="target busy share of every expert group")
    tolerance: float = spec(0.1, ge=0, le=0.9, doc="no change while utilisation / target is within 1 +- tolerance")


def _size(ready: int, target: int, ratio: float, what: str, tolerance: float) -> ScaleTarget:
    if abs(ratio - 1.0) <= tolerance:
        return ScaleTarget(target, f"{what}: within {tolerance:.0%} of target")
    want = proportional(ready, ratio, 1.0)
    return ScaleTarget(want, f"{what}: {ratio:.2f}x target over {ready} ready -> {want}")


@autoscaling_policy(params=TargetUtilisationParams)
def target_utilisation(ctx: PolicyContext) -> tuple[Decision, dict]:
    """Replicas = ceil(ready x utilisation / target) per unit, within a tolerance band."""
    s, p = ctx.signals, ctx.params
    busy_ratio = s.trunk.busy / p.trunk_busy
    slot_ratio = s.sequence_utilisation / p.sequence_slots
    ratio = max(busy_ratio, slot_ratio)
    what = f"trunk busy {s.trunk.busy:.2f} (target {p.trunk_busy:g}), slots {s.sequence_utilisation:.2f} (target {p.sequence_slots:g})"
    trunk = _size(s.trunk.replicas, s.trunk.target, ratio, what, p.tolerance)
    groups = {
        name: _size(
            g.replicas, g.target, g.busy / p.expert_busy, f"busy {g.busy:.2f} (target {p.expert_busy:g})", p.tolerance
        )
        for name, g in s.groups.items()
    }
    redundant, why = hot_experts(s, ctx.config)
    return Decision(trunk, groups, redundant, why), {}
