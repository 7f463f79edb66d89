"""The autoscaling policy and the alerts: the ConfigMap is what the server's loader accepts, the values
schema checks the policy by the loader's rules, and the SLO alerts use the metric names that
cluster/telemetry.py exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from chart_harness import CHART, FULLNAME, MINIMAL, MULTI_GPU, TLS_AUTH_MON, one, worker_groups


@pytest.mark.parametrize("values", [None, MINIMAL, MULTI_GPU], ids=["defaults", "minimal-cpu", "multi-gpu"])
def test_policy_configmap_is_what_the_server_loads(render, values, tmp_path):
    from moeserve.cluster.autoscaling.config import load_config

    objects = render(values)
    cm = one(objects, "ConfigMap", f"{FULLNAME}-autoscaling")
    path = tmp_path / "policy.yaml"
    path.write_text(cm["data"]["policy.yaml"])
    config = load_config(path)  # the server's own loader: fields, ranges, the policy and its params
    given = yaml.safe_load((values or CHART / "values.yaml").read_text())["autoscaling"]["policy"]
    assert config.policy == given["policy"] and config.interval_s == given["interval_s"]
    if values == MULTI_GPU:
        assert config.params.setpoint == 0.6 and config.limits.bounds("g0").min_replicas == 2
        assert config.slo.quantile == "p99"
    # A changed policy rolls the trunk pods (they read it at start).
    trunk = worker_groups(objects)["trunk"]["template"]["metadata"]["annotations"]
    changed = worker_groups(render(values, "--set", "autoscaling.policy.interval_s=7"))["trunk"]
    assert changed["template"]["metadata"]["annotations"]["checksum/autoscaling"] != trunk["checksum/autoscaling"]


def test_policy_schema_is_the_loaders():
    """values.schema.json checks autoscaling.policy by exactly the rules of the server's loader."""
    from moeserve.cluster.autoscaling.config import AutoscalingConfig
    from moeserve.cluster.autoscaling.schema import json_schema

    schema = json.loads((CHART / "values.schema.json").read_text())
    policy = dict(schema["properties"]["autoscaling"]["properties"]["policy"])
    policy.pop("description")
    assert policy == json_schema(AutoscalingConfig), "run `python tests/helm/sync_policy_schema.py` to update the chart"


def exported_metric_names() -> set[str]:
    """Names on the Prometheus endpoint of cluster/telemetry.py, with every instrument recorded once."""
    from prometheus_client import generate_latest

    from moeserve.cluster.telemetry import Telemetry

    tel = Telemetry()
    try:
        for hist in (tel.ttft, tel.tpot, tel.e2e_latency, tel.queue_wait, tel.step_time):
            hist.record(0.1)
        for counter in (tel.requests, tel.errors, tel.input_tokens, tel.output_tokens, tel.expert_tokens, tel.scaling_events):
            counter.add(1)
        tel.add_gauge_source(lambda: {"queue_depth": 1, "running_sequences": 1, "kv_blocks_used": 1, "kv_blocks_total": 2})
        tel.set_group_utilisation("g0", 0.5)
        text = generate_latest(tel.registry).decode()
    finally:
        tel.shutdown()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_alerts_use_metric_names_telemetry_exports(render):
    objects = render(TLS_AUTH_MON)
    rule = one(objects, "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    used = {m for r in rules for m in re.findall(r"\b(moeserve_[a-z_]+)", r["expr"])}
    assert {"moeserve_ttft_seconds_bucket", "moeserve_tpot_seconds_bucket"} <= used
    assert used <= exported_metric_names(), f"not exported by cluster/telemetry.py: {used - exported_metric_names()}"
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert alerts["MoeserveTTFTSLOBreach"]["expr"] == "moeserve:ttft_seconds:p99 > 2"  # the policy's slo.ttft_s
    assert alerts["MoeserveTTFTSLOBreach"]["for"] == "5m" and alerts["MoeserveTTFTSLOBreach"]["labels"]["team"] == "inference"
    for alert in alerts.values():
        for name in re.findall(r"\b(moeserve:[a-z_]+:p[0-9_]+)", alert["expr"]):
            assert name in recorded
    # Every rule selects the series of this release's metrics Service, which the ServiceMonitor scrapes.
    job = f'job="{FULLNAME}-metrics"'
    assert all(job in r["expr"] for r in rules if "moeserve_" in r["expr"] or "up{" in r["expr"])
    monitor = one(objects, "ServiceMonitor")
    metrics_svc = one(objects, "Service", f"{FULLNAME}-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == metrics_svc["spec"]["ports"][0]["name"] == "metrics"
    assert metrics_svc["spec"]["ports"][0]["port"] == 9464
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_monitoring_objects_are_optional(render):
    kinds = {o["kind"] for o in render(MINIMAL)}
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    assert "Secret" not in kinds  # no auth, no TLS
