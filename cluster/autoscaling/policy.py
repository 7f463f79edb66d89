"""The policy contract, the built-in registry, and loading a custom policy by import path.

A policy is a pure function `policy(ctx: PolicyContext) -> (Decision, new_state)`: the signals
snapshot, the validated configuration and the state it returned last time in; desired targets
(each with a reason) and its next state out. It reads no clock and touches no cluster, so the
simulator replays it exactly. Bounds, delays, cool-down and step are not its business:
`limits.with_limits` applies them around any policy.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .decisions import Decision, ScaleTarget
from .schema import ConfigError
from .signals import Signals

if TYPE_CHECKING:
    from .config import AutoscalingConfig

PolicyState = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """Everything a policy may look at."""

    signals: Signals
    config: AutoscalingConfig
    state: PolicyState  # what the policy returned last time; {} on the first run

    @property
    def params(self) -> Any:
        """The policy's own parameters (an instance of its params dataclass, or a plain mapping)."""
        return self.config.params


PolicyFn = Callable[[PolicyContext], "tuple[Decision, PolicyState]"]


class PolicyError(RuntimeError):
    """A policy returned something that is not a decision for this cluster."""


def autoscaling_policy(params: type | None = None) -> Callable[[PolicyFn], PolicyFn]:
    """Mark a function as a policy; `params` is the dataclass its `params:` section is parsed into."""
    if params is not None and not dataclasses.is_dataclass(params):
        raise TypeError(f"params: expected a dataclass, got {params!r}")

    def mark(fn: PolicyFn) -> PolicyFn:
        fn.params_type = params  # type: ignore[attr-defined]
        return fn

    return mark


@dataclass(frozen=True, slots=True)
class ResolvedPolicy:
    name: str
    fn: PolicyFn
    params_type: type | None


BUILTIN = {
    "target_utilisation": "moeserve.cluster.autoscaling.policies.target_utilisation:target_utilisation",
    "slo": "moeserve.cluster.autoscaling.policies.slo:slo",
}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def resolve_policy(name: str) -> ResolvedPolicy:
    """Find a built-in by name or import `package.module:function`; check it can be a policy."""
    target = BUILTIN.get(name, name)
    if not _IMPORT_PATH.match(target):
        raise ConfigError(
            "policy",
            f"{name!r} is neither a built-in ({', '.join(BUILTIN)}) nor an import path 'package.module:function'",
        )
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("policy", f"cannot import module {module_name!r} of {name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError("policy", f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError("policy", f"{name!r} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ConfigError("policy", f"{name!r}: cannot read its signature") from None
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    others = [p for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if len(positional) != 1 or others:
        raise ConfigError(
            "policy",
            f"{name!r} takes ({', '.join(sig.parameters)}); a policy takes exactly one argument, the PolicyContext",
        )
    params_type = getattr(fn, "params_type", None)
    if params_type is not None and not dataclasses.is_dataclass(params_type):
        raise ConfigError("policy", f"{name!r}.params_type must be a dataclass, got {params_type!r}")
    return ResolvedPolicy(name, fn, params_type)


def run_policy(fn: PolicyFn, ctx: PolicyContext, name: str = "policy") -> tuple[Decision, dict[str, Any]]:
    """Call a policy and check its answer fits the cluster; units it leaves out keep their target."""
    out = fn(ctx)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise PolicyError(f"{name} returned {type(out).__name__}; a policy returns (Decision, state)")
    decision, state = out
    if not isinstance(decision, Decision):
        raise PolicyError(f"{name} returned {type(decision).__name__} as its decision; expected Decision")
    if not isinstance(state, Mapping):
        raise PolicyError(f"{name} returned {type(state).__name__} as its state; expected a mapping")
    signals = ctx.signals
    unknown = sorted(set(decision.groups) - set(signals.groups))
    if unknown:
        raise PolicyError(f"{name} scaled unknown expert group(s) {unknown}; the cluster has {sorted(signals.groups)}")
    experts = {e for g in signals.groups.values() for e in g.experts}
    bad = sorted(e for e in decision.redundant if experts and e not in experts)
    if bad:
        raise PolicyError(f"{name} asked for copies of expert(s) {bad} that no group holds")
    groups = dict(decision.groups)
    for group, sig in signals.groups.items():
        if group not in groups:
            groups[group] = ScaleTarget(sig.target, f"{name} gave no target; kept")
    return dataclasses.replace(decision, groups=groups), dict(state)


def dry_run(policy: ResolvedPolicy, config: AutoscalingConfig) -> None:
    """Run the policy once on a small synthetic snapshot, so a broken policy fails on load, not live."""
    from .signals import GroupSignals, LatencySummary

    signals = Signals(
        now_s=0.0,
        window_s=config.window_s,
        trunk=GroupSignals(replicas=1, busy=0.5),
        groups={"g0": GroupSignals(replicas=1, busy=0.5, experts=(0, 1)), "g1": GroupSignals(replicas=1, busy=0.2, experts=(2, 3))},
        ttft=LatencySummary.of([config.slo.ttft_s * 0.5] * 10),
        tpot=LatencySummary.of([config.slo.tpot_s * 0.5] * 10),
        running_sequences=4,
        sequence_capacity=8,
        expert_load=((40.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0)),
    )
    try:
        run_policy(policy.fn, PolicyContext(signals, config, {}), policy.name)
    except Exception as exc:  # noqa: BLE001 - any failure of a custom policy is a config error
        raise ConfigError("policy", f"{policy.name!r} failed a dry run on a synthetic snapshot: {type(exc).__name__}: {exc}") from None
