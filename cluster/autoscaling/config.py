"""The autoscaling configuration operators write in YAML (or Helm values), validated once on load.

    policy: slo                     # target_utilisation | slo | "package.module:function"
    interval_s: 10                  # how often the policy runs
    window_s: 60                    # sliding window of the signals
    slo: {ttft_s: 2.0, tpot_s: 0.1}
    params: {...}                   # the policy's own parameters (checked by its params dataclass)
    limits: {trunk: {...}, expert_groups: {...}, groups: {g0: {...}}, upscale_delay_s: 0, ...}
    redundant_experts: {enabled: true, max_per_expert: 1, max_total: 8, hot_factor: 2.0}

Errors name the field by its dotted path and the allowed range (`limits.trunk.max_replicas: -1 is
out of range; allowed: >= 1 and <= 4096`). docs/autoscaling.md documents every field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .schema import ConfigError, parse, spec

MAX_REPLICAS = 4096
DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class Bounds:
    """Smallest and largest replica count of one scaled unit."""

    min_replicas: int = spec(1, ge=1, le=MAX_REPLICAS, doc="never fewer replicas (an expert group holds the only copy of its experts)")
    max_replicas: int = spec(8, ge=1, le=MAX_REPLICAS, doc="never more replicas")

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ConfigError(
                "min_replicas", f"{self.min_replicas} is above max_replicas {self.max_replicas}; allowed: <= max_replicas"
            )

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True, slots=True)
class Limits:
    """Written once around every policy: bounds, delays, cool-down and maximum step."""

    trunk: Bounds = spec(default_factory=lambda: Bounds(1, 4), doc="bounds of the trunk workers")
    expert_groups: Bounds = spec(default_factory=Bounds, doc="bounds of every expert group without its own entry")
    groups: Mapping[str, Bounds] = spec(default_factory=dict, doc="bounds by expert group name")
    upscale_delay_s: float = spec(0.0, ge=0, le=DAY_S, doc="scale up only when every recommendation over this long asked for more")
    downscale_delay_s: float = spec(300.0, ge=0, le=DAY_S, doc="scale down only to the highest recommendation over this long")
    cooldown_s: float = spec(0.0, ge=0, le=DAY_S, doc="at least this long between two changes of the same unit")
    max_step_up: int = spec(4, ge=1, le=MAX_REPLICAS, doc="most replicas added to one unit in one decision")
    max_step_down: int = spec(1, ge=1, le=MAX_REPLICAS, doc="most replicas removed from one unit in one decision")

    def __post_init__(self) -> None:
        if "trunk" in self.groups:
            raise ConfigError("groups.trunk", "'trunk' names the trunk workers; set limits.trunk instead")

    def bounds(self, unit: str) -> Bounds:
        """Bounds of `unit` ('trunk' or an expert group name)."""
        if unit == "trunk":
            return self.trunk
        return self.groups.get(unit, self.expert_groups)


@dataclass(frozen=True, slots=True)
class Redundancy:
    """Extra copies of hot experts, placed on other groups by the controller."""

    enabled: bool = spec(True, doc="let policies add copies of hot experts")
    max_per_expert: int = spec(1, ge=0, le=64, doc="most extra copies of one logical expert")
    max_total: int = spec(8, ge=0, le=MAX_REPLICAS, doc="most extra copies over all experts")
    hot_factor: float = spec(2.0, gt=1.0, le=1000.0, doc="an expert is hot when its share of a layer's rows exceeds this many times the mean")


@dataclass(frozen=True, slots=True)
class Slo:
    """The latency objective every request is measured against."""

    ttft_s: float = spec(2.0, gt=0, le=3600.0, doc="time to first token of one request")
    tpot_s: float = spec(0.1, gt=0, le=60.0, doc="mean time per output token after the first, of one request")
    quantile: Literal["p50", "p95", "p99"] = spec("p95", doc="the quantile over the window that policies hold against the SLO")


@dataclass(frozen=True, slots=True)
class AutoscalingConfig:
    """A whole policy file. `params` is the policy's own params dataclass after load_config."""

    policy: str = spec("slo", doc="target_utilisation, slo, or 'package.module:function' of a custom policy")
    interval_s: float = spec(10.0, gt=0, le=3600.0, doc="seconds between two policy runs")
    window_s: float = spec(60.0, gt=0, le=DAY_S, doc="sliding window of rates, quantiles and per-expert load")
    slo: Slo = spec(default_factory=Slo, doc="the latency objective")
    params: Any = spec(default_factory=dict, doc="parameters of the chosen policy")
    limits: Limits = spec(default_factory=Limits, doc="bounds, delays, cool-down and step, applied around any policy")
    redundant_experts: Redundancy = spec(default_factory=Redundancy, doc="extra copies of hot experts")


def parse_config(data: Mapping[str, Any] | None, source: str = "") -> AutoscalingConfig:
    """Validate a policy mapping: fields, ranges, the policy itself and its params."""
    from .policy import dry_run, resolve_policy  # the policy registry imports this module's types

    try:
        raw = parse(AutoscalingConfig, data or {})
        policy = resolve_policy(raw.policy)
        params = parse(policy.params_type, raw.params, "params") if policy.params_type else raw.params
        config = dataclasses.replace(raw, params=params)
        dry_run(policy, config)
        return config
    except ConfigError as exc:
        if source:
            raise ConfigError(exc.path, f"{str(exc).split(': ', 1)[-1] if exc.path else str(exc)} (in {source})") from None
        raise


def load_config(path: str | Path) -> AutoscalingConfig:
    """Read and validate a policy YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("", f"cannot read autoscaling policy {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError("", f"{path}: the policy file must be a mapping, got {type(data).__name__}")
    return parse_config(data, source=str(path))
