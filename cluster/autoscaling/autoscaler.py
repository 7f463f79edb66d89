"""One autoscaling step: resolve the configured policy, wrap it in the limits, carry its state."""

from __future__ import annotations

from typing import Any

from .config import AutoscalingConfig
from .decisions import Decision
from .limits import with_limits
from .policy import PolicyContext, PolicyFn, PolicyState, resolve_policy
from .signals import Signals


def build_policy(config: AutoscalingConfig) -> PolicyFn:
    """The configured policy with bounds, delays, cool-down and step applied around it."""
    resolved = resolve_policy(config.policy)
    return with_limits(resolved.fn, resolved.name)


def autoscale(
    signals: Signals, config: AutoscalingConfig, state: PolicyState, policy: PolicyFn | None = None
) -> tuple[Decision, dict[str, Any]]:
    """Pure: (signals, config, previous state) -> (decision, next state)."""
    policy = policy or build_policy(config)
    return policy(PolicyContext(signals, config, state))


class Autoscaler:
    """Keeps the state between decisions for a caller that runs the policy over time."""

    def __init__(self, config: AutoscalingConfig):
        self.config = config
        self._policy = build_policy(config)
        self.state: dict[str, Any] = {}

    def decide(self, signals: Signals) -> Decision:
        decision, self.state = autoscale(signals, self.config, self.state, self._policy)
        return decision
