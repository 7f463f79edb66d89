"""Traffic-driven autoscaling: signals in, decisions out, through pure and replayable policies.

- `signals.Signals`: one snapshot of the cluster (queue, TTFT/TPOT, per-expert load, busy shares).
- `decisions.Decision`: replicas per unit and extra copies of hot experts, each with a reason.
- `config.load_config`: the operator's YAML, validated with errors naming field and range.
- `policy`: the contract and registry (built-ins `target_utilisation`, `slo`; or `module:function`).
- `limits.with_limits`: bounds, delays, cool-down and step, around any policy.
- `sim`: replay a traffic trace through a model of the cluster (`moeserve autoscale simulate`).
"""

from .autoscaler import Autoscaler, autoscale, build_policy
from .config import AutoscalingConfig, Bounds, Limits, Redundancy, Slo, load_config, parse_config
from .decisions import TRUNK, Decision, ScaleTarget
from .limits import apply_limits, with_limits
from .policy import PolicyContext, PolicyError, autoscaling_policy, resolve_policy
from .schema import ConfigError
from .signals import GroupSignals, LatencySummary, Signals

__all__ = [
    "Autoscaler",
    "AutoscalingConfig",
    "Bounds",
    "ConfigError",
    "Decision",
    "GroupSignals",
    "LatencySummary",
    "Limits",
    "PolicyContext",
    "PolicyError",
    "Redundancy",
    "ScaleTarget",
    "Signals",
    "Slo",
    "TRUNK",
    "apply_limits",
    "autoscale",
    "autoscaling_policy",
    "build_policy",
    "load_config",
    "parse_config",
    "resolve_policy",
    "with_limits",
]
