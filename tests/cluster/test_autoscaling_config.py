"""Policy YAML: validated on load, errors name the field and the allowed range; custom policies by import path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from moeserve.cluster.autoscaling import ConfigError, load_config, parse_config
from moeserve.cluster.autoscaling.config import AutoscalingConfig
from moeserve.cluster.autoscaling.policies.slo import SloParams
from moeserve.cluster.autoscaling.schema import json_schema

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"


@pytest.mark.parametrize("name", ["slo.yaml", "target-utilisation.yaml"])
def test_example_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.limits.expert_groups.max_replicas >= cfg.limits.expert_groups.min_replicas


@pytest.mark.parametrize(
    "data, field, allowed",
    [
        ({"interval_s": 0}, "interval_s", "> 0"),
        ({"window_s": -5}, "window_s", "> 0"),
        ({"slo": {"ttft_s": 0}}, "slo.ttft_s", "> 0"),
        ({"slo": {"quantile": "p90"}}, "slo.quantile", "'p50', 'p95', 'p99'"),
        ({"limits": {"trunk": {"max_replicas": -1}}}, "limits.trunk.max_replicas", ">= 1 and <= 4096"),
        ({"limits": {"expert_groups": {"min_replicas": 0}}}, "limits.expert_groups.min_replicas", ">= 1"),
        ({"limits": {"groups": {"g1": {"min_replicas": 3, "max_replicas": 2}}}}, "limits.groups.g1.min_replicas", "<= max_replicas"),
        ({"limits": {"max_step_up": 0}}, "limits.max_step_up", ">= 1"),
        ({"limits": {"downscale_delay_s": 1e9}}, "limits.downscale_delay_s", "<= 86400"),
        ({"limits": {"cooldown_s": "soon"}}, "limits.cooldown_s", "finite number"),
        ({"limits": {"groups": {"trunk": {}}}}, "limits.groups.trunk", "limits.trunk"),
        ({"redundant_experts": {"hot_factor": 1.0}}, "redundant_experts.hot_factor", "> 1.0"),
        ({"redundant_experts": {"enabled": "yes"}}, "redundant_experts.enabled", "true or false"),
        ({"params": {"setpoint": 1.5}}, "params.setpoint", "> 0 and <= 1"),
        ({"params": {"speed": 1}}, "params.speed", "allowed: calm, critical_share"),
        ({"polcy": "slo"}, "polcy", "allowed: interval_s, limits"),
        ({"policy": "nope"}, "policy", "target_utilisation, slo"),
    ],
)
def test_errors_name_the_field_and_the_allowed_range(data, field, allowed):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == field
    assert str(info.value).startswith(f"{field}: ")
    assert allowed in str(info.value)


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policy: slo\nlimits: {max_step_down: 0}\n")
    with pytest.raises(ConfigError, match=r"limits.max_step_down: 0 is out of range; allowed: >= 1 and <= 4096 \(in .*p.yaml\)"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
    path.write_text("policy: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_defaults_and_params_dataclass():
    cfg = parse_config(None)
    assert isinstance(cfg, AutoscalingConfig) and cfg.policy == "slo"
    assert cfg.params == SloParams()
    assert parse_config({"params": {"setpoint": 0.7}}).params.setpoint == 0.7


CUSTOM = '''
from dataclasses import dataclass
from moeserve.cluster.autoscaling import Decision, ScaleTarget, autoscaling_policy
from moeserve.cluster.autoscaling.schema import spec

@dataclass(frozen=True)
class Params:
    per_group: int = spec(2, ge=1, le=16, doc="replicas of every group")

@autoscaling_policy(params=Params)
def fixed(ctx):
    n = ctx.params.per_group
    return Decision(ScaleTarget(1, "fixed"), {g: ScaleTarget(n, "fixed") for g in ctx.signals.groups}), {}

def broken(ctx):
    return {"g0": 3}

def two_args(ctx, other):
    return None

not_callable = 3
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "operator_policies.py").write_text(textwrap.dedent(CUSTOM))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "operator_policies"


def test_custom_policy_by_import_path(custom_module):
    from moeserve.cluster.autoscaling import Autoscaler, GroupSignals, Signals

    cfg = parse_config({"policy": f"{custom_module}:fixed", "params": {"per_group": 3}})
    assert cfg.params.per_group == 3
    auto = Autoscaler(cfg)
    s = Signals(now_s=0.0, window_s=60.0, trunk=GroupSignals(1), groups={"g0": GroupSignals(1), "g1": GroupSignals(5)})
    d = auto.decide(s)
    assert d.groups["g0"].replicas == 3  # helpers still apply: step up within 4
    assert d.groups["g1"].replicas == 5  # max_step_down 1 would allow 4, the downscale delay holds it
    with pytest.raises(ConfigError, match=r"params.per_group: 99 is out of range; allowed: >= 1 and <= 16"):
        parse_config({"policy": f"{custom_module}:fixed", "params": {"per_group": 99}})


@pytest.mark.parametrize(
    "attr, message",
    [
        ("broken", "failed a dry run"),
        ("two_args", "exactly one argument"),
        ("not_callable", "not a function"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_bad_custom_policies_fail_on_load(custom_module, attr, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config({"policy": f"{custom_module}:{attr}"})
    assert info.value.path == "policy"


def test_unimportable_policy_module():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.mod'"):
        parse_config({"policy": "no_such_pkg.mod:fn"})
    with pytest.raises(ConfigError, match="import path"):
        parse_config({"policy": "os.system('x')"})


def test_json_schema_matches_the_ranges():
    schema = json_schema(AutoscalingConfig)
    trunk = schema["properties"]["limits"]["properties"]["trunk"]["properties"]["max_replicas"]
    assert trunk == {"type": "integer", "minimum": 1, "maximum": 4096, "description": trunk["description"]}
    assert schema["properties"]["slo"]["properties"]["quantile"]["enum"] == ["p50", "p95", "p99"]
    assert schema["additionalProperties"] is False
