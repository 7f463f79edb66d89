"""Pieces the built-in policies share: proportional sizing and hot-expert detection."""

from __future__ import annotations

import math

import numpy as np

from ..config import AutoscalingConfig
from ..signals import Signals


def proportional(ready: int, utilisation: float, target: float) -> int:
    """Replicas that bring `utilisation` (measured over `ready` replicas) down to `target`."""
    if ready <= 0:
        return 1 if utilisation > 0 else 0
    # Round away float noise so 0.6/0.6*3 is 3, not 4.
    return max(1, math.ceil(round(ready * utilisation / target, 6)))


def hot_experts(signals: Signals, config: AutoscalingConfig) -> tuple[dict[int, int], str]:
    """Extra copies for experts whose share of the rows, averaged over layers, exceeds hot_factor x the mean.

    A copy holds the expert for every layer, so what it relieves is the expert's load across
    layers; an expert hot in one layer only is the gate's imbalance, not a placement problem.

    An expert n times over the threshold gets max(1, ceil(n) - 1) extra copies, so each holder's
    share falls to about the threshold; hottest first.
    """
    shares = signals.expert_shares()
    if shares.size == 0 or not config.redundant_experts.enabled:
        return {}, "no per-expert load observed" if shares.size == 0 else "redundant experts disabled"
    experts = shares.shape[1]
    peak = shares.mean(axis=0)
    threshold = config.redundant_experts.hot_factor / experts
    hot = np.flatnonzero(peak > threshold)
    if hot.size == 0:
        return {}, f"no expert above {config.redundant_experts.hot_factor:g}x the mean share of its layer"
    order = hot[np.argsort(-peak[hot], kind="stable")]
    extra = {int(e): max(1, math.ceil(peak[e] / threshold) - 1) for e in order}
    top = ", ".join(f"e{int(e)} {peak[e] * experts:.1f}x" for e in order[:4])
    return extra, f"hot experts (share of rows vs mean): {top}"
