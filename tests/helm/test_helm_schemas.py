"""Every object the chart renders is valid: `helm lint`, the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail) and, for the RayCluster, KubeRay's CRD schema
(jsonschema, plus the fields the API server would silently prune)."""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chart_harness import CHART, CI_VALUES, by_kind, run_helm

CRDS = Path(__file__).parent / "crds"
SHARED_CRDS = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"
# sha256 of KubeRay v1.7.0's helm-chart/kuberay-operator/crds/ray.io_rayclusters.yaml (../shared/kuberay-crds)
KUBERAY_RAYCLUSTER_CRD_SHA256 = "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the validator knows.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Kinds outside the Kubernetes API that the chart may render, and how each is checked.
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor", "PrometheusRule"}
VALUES = [None, *CI_VALUES]
IDS = ["defaults", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def crd_schema(kind: str, version: str = "v1") -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    docs = [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]
    (crd,) = docs
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def pruned_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields of `obj` that the API server would drop silently: not in a structural schema's properties."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        out = []
        for key, value in obj.items():
            where = f"{path}.{key}"
            if props is not None and key in props:
                out += pruned_fields(value, props[key], where)
            elif isinstance(extra, dict):
                out += pruned_fields(value, extra, where)
            elif props is not None:
                out.append(where)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [f for i, item in enumerate(obj) for f in pruned_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def crd_errors(obj: dict) -> list[str]:
    schema = crd_schema(obj["kind"])
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + [f"{f}: unknown field (the API server would prune it)" for f in pruned_fields(obj, schema)]


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_lint_strict(helm, values):
    args = ["lint", str(CHART), "--strict"] + (["-f", str(values)] if values else [])
    out = run_helm(helm, *args)
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_every_object_matches_the_kubernetes_openapi_schema(render, values):
    objects = render(values)
    checked = 0
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")
        checked += 1
    # Service, ServiceAccount, ConfigMap, Role, RoleBinding, NetworkPolicy at least
    assert checked >= 6


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_pod_templates_of_the_raycluster_are_valid_pods(render, values):
    """The CRD embeds PodTemplateSpec; checking it as core/v1 too catches what the CRD's copy is loose on."""
    (cluster,) = by_kind(render(values), "RayCluster")
    spec = cluster["spec"]
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    for name, template in templates:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(pod, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"pod template of {name} on Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_raycluster_matches_the_kuberay_crd(render, values):
    (cluster,) = by_kind(render(values), "RayCluster")
    assert crd_errors(cluster) == []


def test_the_crd_check_rejects_what_kuberay_rejects(render):
    """The checker itself can fail: a wrong type, an unknown enum value and a pruned field are reported."""
    (cluster,) = by_kind(render(None), "RayCluster")
    bad = yaml.safe_load(yaml.safe_dump(cluster))
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    bad["spec"]["autoscalerOptions"]["upscalingMode"] = "Eager"
    bad["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["gpus"] = 1
    errors = "\n".join(crd_errors(bad))
    assert "workerGroupSpecs.0.maxReplicas: 'four' is not of type 'integer'" in errors
    assert "upscalingMode: 'Eager' is not one of" in errors
    assert ".spec.workerGroupSpecs[1].template.spec.containers[0].gpus: unknown field" in errors


def test_vendored_crd_is_kuberays():
    """tests/helm/crds is KubeRay's CRD verbatim (after the attribution header): its body has the digest
    of KubeRay v1.7.0's file, and equals ../shared/kuberay-crds where that exists."""
    vendored = (CRDS / "ray.io_rayclusters.yaml").read_text()
    header, _, body = vendored.partition("\n---\n")
    assert "Apache License, Version 2.0" in header and "KubeRay" in header
    assert hashlib.sha256(("---\n" + body).encode()).hexdigest() == KUBERAY_RAYCLUSTER_CRD_SHA256
    shared = SHARED_CRDS / "ray.io_rayclusters.yaml"
    if shared.exists():
        assert "---\n" + body == shared.read_text()


def kuberay_spec_errors(cluster: dict) -> list[str]:
    """The checks the KubeRay operator (1.7) makes on a RayCluster beyond its CRD schema, as far as the
    chart can break them: name, per-group resources and labels, idle timeouts, autoscaler v2 rules."""
    errors = []
    name = cluster["metadata"]["name"]
    if len(name) > 63 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = cluster["spec"]
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = autoscaling and spec.get("autoscalerOptions", {}).get("version") == "v2"
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    names = [n for n, _ in groups[1:]]
    if len(set(names)) != len(names):
        errors.append(f"worker group names repeat: {names}")
    for gname, group in groups:
        params = group.get("rayStartParams", {})
        pod = group["template"]["spec"]
        if not pod.get("containers"):
            errors.append(f"{gname}: no container")
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{gname}: resources both in rayStartParams and .resources")
        if "labels" in params:
            errors.append(f"{gname}: rayStartParams labels")
        if gname != "head":
            if not autoscaling and ("minReplicas" not in group or "maxReplicas" not in group):
                errors.append(f"{gname}: min/maxReplicas needed without autoscaling")
            if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31 - 1):
                errors.append(f"{gname}: minReplicas above maxReplicas")
            if "idleTimeoutSeconds" in group and not v2:
                errors.append(f"{gname}: idleTimeoutSeconds without autoscaler v2")
            if group.get("suspend") and autoscaling:
                errors.append(f"{gname}: suspended with the autoscaler on")
        if v2 and pod.get("restartPolicy", "Never") != "Never":
            errors.append(f"{gname}: restartPolicy must be Never or unset with autoscaler v2")
        env = {e["name"] for e in pod["containers"][0].get("env", [])}
        if gname == "head" and "RAY_enable_autoscaler_v2" in env:
            errors.append("head: RAY_enable_autoscaler_v2 set by hand")
    return errors


@pytest.mark.parametrize("sets", [[], ["rayAutoscaler.version=v1"], ["rayAutoscaler.enabled=false"]], ids=["v2", "v1", "off"])
@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_raycluster_passes_the_operators_own_checks(render, values, sets):
    (cluster,) = by_kind(render(values, *[a for s in sets for a in ("--set", s)]), "RayCluster")
    assert kuberay_spec_errors(cluster) == []
    assert crd_errors(cluster) == []


def test_the_operator_check_can_fail(render):
    (cluster,) = by_kind(render(None), "RayCluster")
    bad = yaml.safe_load(yaml.safe_dump(cluster))
    bad["metadata"]["name"] = "9-lives"
    bad["spec"]["autoscalerOptions"]["version"] = "v1"
    bad["spec"]["workerGroupSpecs"][1]["template"]["spec"]["restartPolicy"] = "Always"
    errors = kuberay_spec_errors(bad)
    assert any("DNS-1035" in e for e in errors) and any("idleTimeoutSeconds without autoscaler v2" in e for e in errors)
