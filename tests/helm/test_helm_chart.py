"""What the chart renders does what the cluster needs: worker groups and their Ray resources, the
serving entrypoint and its flags (run through bash against stand-ins of `ray` and `moeserve`), probes,
Services, the autoscaling policy the server loads, monitoring on the metric names telemetry exports."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from chart_harness import CHART, NAMESPACE, RELEASE, by_kind, one, run_helm

CI = CHART / "ci"
MINIMAL, MULTI_GPU, TLS_AUTH_MON = (CI / f"{n}-values.yaml" for n in ("minimal-cpu", "multi-gpu", "tls-auth-monitoring"))
FULLNAME = f"{RELEASE}-moeserve"
# Flags the chart passes that `moeserve serve` does not parse yet: others are adding them (see the
# chart README). Once the parser knows one, this set may drop it; a flag in neither place fails.
PENDING_SERVE_FLAGS = {"--expert-resource", "--autoscaling-policy"}


def worker_groups(objects) -> dict[str, dict]:
    (cluster,) = by_kind(objects, "RayCluster")
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}


def kuberay_start_command(params: dict[str, str], head: bool) -> str:
    """The `ray start` line KubeRay puts in $KUBERAY_GEN_RAY_START_CMD: ` --key=value` per parameter,
    "true" as a bare flag and "false" left out, values pasted in as they are."""
    params = {"block": "true", **params}
    if not head:
        params = {"address": "inference-moeserve-head-svc.llm.svc.cluster.local:6379", **params}
    flags = []
    for key, value in params.items():
        if value.lower() == "true":
            flags.append(f"--{key}")
        elif value.lower() != "false":
            flags.append(f"--{key}={value}")
    return "ray start " + ("--head " if head else "") + " ".join(flags)


def run_container(container: dict, start_cmd: str, tmp_path: Path) -> tuple[list[str], list[str] | None]:
    """Run the container's command with bash, `ray` and `moeserve` replaced by recorders; returns
    (ray argv, moeserve argv or None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("ray", "moeserve"):
        script = bin_dir / name
        script.write_text(textwrap.dedent(f"""\
            #!/usr/bin/env python3
            import json, sys
            with open({str(tmp_path / (name + '.json'))!r}, "w") as f:
                json.dump(sys.argv[1:], f)
            """))
        script.chmod(0o755)
    assert container["command"] == ["/bin/bash", "-lc", "--"]
    # -c, not -lc: a login shell would read this machine's profile, which may reset PATH.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBERAY_GEN_RAY_START_CMD": start_cmd}
    out = subprocess.run(["/bin/bash", "-c", "--", *container["args"]], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    ray = json.loads((tmp_path / "ray.json").read_text())
    serve = tmp_path / "moeserve.json"
    return ray, json.loads(serve.read_text()) if serve.exists() else None


def ray_resources(ray_argv: list[str]) -> dict[str, int]:
    (flag,) = [a for a in ray_argv if a.startswith("--resources=")]
    return json.loads(flag.removeprefix("--resources="))


def parse_serve(argv: list[str]):
    """`moeserve serve` argv through the real parser; returns (namespace, flags it does not know)."""
    from moeserve.cluster.cli import build_parser

    assert argv[0] == "serve"
    args, unknown = build_parser().parse_known_args(argv)
    return args, {a for a in unknown if a.startswith("--")}


def test_multi_gpu_worker_groups_split_the_expert_groups(render, tmp_path):
    groups = worker_groups(render(MULTI_GPU))
    assert list(groups) == ["trunk", "experts-h200", "experts-h100"]
    (cluster,) = by_kind(render(MULTI_GPU), "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"

    hosted = {}
    for name in ("experts-h200", "experts-h100"):
        g = groups[name]
        pod = g["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert pod["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-H")
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        ray_argv, serve = run_container(container, kuberay_start_command(g["rayStartParams"], head=False), tmp_path)
        assert serve is None and "--block" in ray_argv  # expert pods only run Ray
        hosted[name] = ray_resources(ray_argv)
    assert hosted["experts-h200"] == {f"moeserve_expert_{i}": 8 for i in range(8)}
    assert hosted["experts-h100"] == {f"moeserve_expert_{i}": 8 for i in range(8, 16)}
    assert (groups["experts-h200"]["minReplicas"], groups["experts-h200"]["maxReplicas"]) == (1, 5)
    assert (groups["experts-h100"]["minReplicas"], groups["experts-h100"]["maxReplicas"]) == (1, 6)
    assert groups["trunk"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8


def autoscaler_node_types(objects) -> dict[str, dict]:
    """The node types Ray's in-tree autoscaler derives from the RayCluster (Ray's own KubeRay code)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    (cluster,) = by_kind(objects, "RayCluster")
    return _derive_autoscaling_config_from_ray_cr(cluster)["available_node_types"]


@pytest.mark.parametrize("values", [MINIMAL, MULTI_GPU], ids=["minimal-cpu", "multi-gpu"])
def test_pending_expert_replicas_become_pods_of_their_worker_group(render, values):
    """An expert-group replica's demand (GroupResources.actor_options) fits exactly one node type of
    the autoscaler: the worker group holding that group. Nothing fits the head; trunk demand fits the trunk."""
    from moeserve.experts.group import GroupResources

    types = autoscaler_node_types(render(values))
    assert types["headgroup"]["resources"]["CPU"] == 0 and types["headgroup"]["max_workers"] == 0
    assert types["trunk"]["resources"]["moeserve_trunk"] == 1 and types["trunk"]["resources"]["GPU"] == 0
    layout = yaml.safe_load((values).read_text())["experts"]["workerGroups"]
    gpus = layout[0]["gpus"]
    first = 0
    for group in layout:
        assert (types[group["name"]]["min_workers"], types[group["name"]]["max_workers"]) == (group["minReplicas"], group["maxReplicas"])
        for gid in range(first, first + group["expertGroups"]):
            opts = GroupResources(num_gpus=1 if gpus else 0, custom_resource="moeserve_expert_{group}").actor_options(gid)
            demand = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"], **opts["resources"]}
            fits = [name for name, t in types.items()
                    if all(t["resources"].get(k, 0) >= v for k, v in demand.items() if v)]
            assert fits == [group["name"]], f"expert group {gid} fits {fits}"
        first += group["expertGroups"]
    assert [n for n, t in types.items() if t["resources"].get("moeserve_trunk")] == ["trunk"]


@pytest.mark.parametrize("values", [None, MINIMAL, MULTI_GPU, TLS_AUTH_MON], ids=["defaults", "minimal-cpu", "multi-gpu", "tls-auth-monitoring"])
def test_trunk_joins_ray_then_serves_with_flags_the_server_parses(render, values, tmp_path):
    objects = render(values)
    trunk = worker_groups(objects)["trunk"]
    (container,) = trunk["template"]["spec"]["containers"]
    ray_argv, serve_argv = run_container(container, kuberay_start_command(trunk["rayStartParams"], head=False), tmp_path)
    assert "--block" not in ray_argv, "ray start must return so the edge can start"
    assert ray_resources(ray_argv) == {"moeserve_trunk": 1}
    assert "--num-gpus=0" in ray_argv

    args, unknown = parse_serve(serve_argv)
    assert unknown <= PENDING_SERVE_FLAGS, f"the chart passes flags `moeserve serve` does not have: {unknown - PENDING_SERVE_FLAGS}"
    assert (args.host, args.port) == ("0.0.0.0", 50051)
    assert args.transport == "ray"
    cm_path = "/etc/moeserve/autoscaling/policy.yaml"
    assert serve_argv[serve_argv.index("--autoscaling-policy") + 1] == cm_path
    assert serve_argv[serve_argv.index("--expert-resource") + 1] == "moeserve_expert_{group}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == args.port
    assert ports["metrics"] == args.prometheus_port and args.prometheus_host == "0.0.0.0"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert os.path.dirname(cm_path) in mounts
    if values == MULTI_GPU:
        assert args.expert_groups == 16 and args.model == "/models/DeepSeek-V3" and args.max_model_len == 32768
        assert "/models" in mounts
    elif values == TLS_AUTH_MON:
        assert args.tls_cert and args.tls_key and args.tls_client_ca and args.auth_token_file
        assert args.otlp_endpoint == "http://otel-collector.observability:4317"
        for flag in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            assert os.path.dirname(getattr(args, flag)) in mounts, flag
    else:
        assert args.expert_groups == 2 and args.model is None


def test_head_schedules_nothing_and_runs_kuberays_command(render, tmp_path):
    (cluster,) = by_kind(render(MINIMAL), "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ray_argv, serve = run_container(head["template"]["spec"]["containers"][0],
                                    kuberay_start_command(head["rayStartParams"], head=True), tmp_path)
    assert serve is None and ray_argv[:2] == ["start", "--head"] and "--num-cpus=0" in ray_argv
    # Only the head mounts a service account token: the autoscaler sidecar KubeRay adds uses it.
    assert head["template"]["spec"]["automountServiceAccountToken"] is True
    for g in cluster["spec"]["workerGroupSpecs"]:
        assert g["template"]["spec"]["automountServiceAccountToken"] is False


def test_probes_use_grpc_health_of_the_edge(render):
    trunk = worker_groups(render(None))["trunk"]["template"]["spec"]
    (c,) = trunk["containers"]
    assert c["startupProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": "moeserve.v1.Inference"}
    assert c["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 1800  # model load
    assert trunk["terminationGracePeriodSeconds"] == 30 + 15  # drain (--grace) fits in the grace period


def test_tls_probes_run_the_mounted_checker(render):
    objects = render(TLS_AUTH_MON)
    (c,) = worker_groups(objects)["trunk"]["template"]["spec"]["containers"]
    for probe, service in (("startupProbe", ""), ("readinessProbe", "moeserve.v1.Inference")):
        cmd = c[probe]["exec"]["command"]
        assert cmd[:2] == ["python", "/etc/moeserve/probe/grpc_health_probe.py"]
        assert f"--service={service}" in cmd and "--ca=/etc/moeserve/tls/ca.crt" in cmd
        assert "--cert=/etc/moeserve/tls/tls.crt" in cmd  # the server requires client certificates
    probe_cm = one(objects, "ConfigMap", f"{FULLNAME}-probe")
    assert probe_cm["data"]["grpc_health_probe.py"] == (CHART / "files" / "grpc_health_probe.py").read_text()


def test_grpc_service_selects_trunk_pods(render):
    objects = render(TLS_AUTH_MON)
    svc = one(objects, "Service", FULLNAME)
    trunk_labels = worker_groups(objects)["trunk"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= trunk_labels.items()
    for name, g in worker_groups(objects).items():
        if name != "trunk":
            assert not svc["spec"]["selector"].items() <= g["template"]["metadata"]["labels"].items()
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]


def test_pdbs_and_network_policies_select_the_pods_they_mean(render):
    objects = render(MULTI_GPU)
    groups = worker_groups(objects)
    pdbs = {p["metadata"]["name"]: p for p in by_kind(objects, "PodDisruptionBudget")}
    assert set(pdbs) == {f"{FULLNAME}-{g}" for g in groups}
    for name, g in groups.items():
        selector = pdbs[f"{FULLNAME}-{name}"]["spec"]["selector"]["matchLabels"]
        matched = [n for n, other in groups.items() if selector.items() <= other["template"]["metadata"]["labels"].items()]
        assert matched == [name]
    policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
    grpc = policies[f"{FULLNAME}-grpc"]["spec"]["ingress"][0]
    assert grpc["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]
    assert f"{FULLNAME}-dashboard" not in policies  # nobody outside the release reaches the dashboard


def test_autoscaler_role_is_limited_to_its_own_raycluster(render):
    objects = render(None)
    role = one(objects, "Role")
    assert {r["apiGroups"][0] for r in role["rules"]} == {"", "ray.io"}
    (ray_rule,) = [r for r in role["rules"] if r["apiGroups"] == ["ray.io"]]
    assert ray_rule["resourceNames"] == [FULLNAME] and set(ray_rule["verbs"]) == {"get", "patch"}
    binding = one(objects, "RoleBinding")
    sa = one(objects, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    off = render(None, "--set", "rayAutoscaler.enabled=false")
    assert not by_kind(off, "Role") and not by_kind(off, "RoleBinding")
    assert by_kind(off, "RayCluster")[0]["spec"]["enableInTreeAutoscaling"] is False


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


def test_created_secrets_for_auth_and_tls(render, tmp_path):
    cert, key = self_signed(tmp_path)
    objects = render(None, "--set", "auth.enabled=true", "--set", "auth.tokens={token-aaaaaaaaaaaaaaaa,token-bbbbbbbbbbbbbbbb}",
                     "--set", "tls.enabled=true", "--set-file", f"tls.cert={cert}", "--set-file", f"tls.key={key}")
    auth = one(objects, "Secret", f"{FULLNAME}-auth")
    assert auth["stringData"]["tokens"].split() == ["token-aaaaaaaaaaaaaaaa", "token-bbbbbbbbbbbbbbbb"]
    tls = one(objects, "Secret", f"{FULLNAME}-tls")
    assert tls["type"] == "kubernetes.io/tls" and set(tls["data"]) == {"tls.crt", "tls.key"}
    trunk = worker_groups(objects)["trunk"]["template"]["spec"]
    volumes = {v["name"]: v for v in trunk["volumes"]}
    assert volumes["auth"]["secret"] == {"secretName": f"{FULLNAME}-auth", "items": [{"key": "tokens", "path": "tokens"}]}
    assert volumes["tls"]["secret"]["secretName"] == f"{FULLNAME}-tls"
    (c,) = trunk["containers"]
    assert "--ca=/etc/moeserve/tls/tls.crt" in c["readinessProbe"]["exec"]["command"]  # self-signed: trusts itself


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_notes_tell_how_to_call_the_edge(helm):
    out = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                   "-f", str(TLS_AUTH_MON))
    notes = out.split("NOTES:", 1)[1]
    assert f"port-forward svc/{FULLNAME} 50051:50051" in notes
    assert "--tls-ca" in notes and "--auth-token-file" in notes
    assert "--tls-cert" in notes  # the edge asks for client certificates (tls.clientAuth)
    assert f"PrometheusRule {FULLNAME}" in notes
    shlex.split(notes.split("moeserve generate", 1)[1].splitlines()[0])  # a command line that parses


def test_admin_api_stays_on_loopback_with_its_own_tokens(render):
    objects = render(None, "--set", "admin.tokens={admin-aaaaaaaaaaaaaaaa}", "--set", "admin.port=50099")
    (c,) = worker_groups(objects)["trunk"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MOESERVE_ADMIN_PORT"]["value"] == "50099"
    assert "MOESERVE_ADMIN_HOST" not in env  # loopback: reached by port-forward or exec, never a Service
    ref = env["MOESERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = one(objects, "Secret", ref["name"])
    assert secret["stringData"][ref["key"]] == "admin-aaaaaaaaaaaaaaaa"
    assert all(p["port"] != 50099 for svc in by_kind(objects, "Service") for p in svc["spec"]["ports"])
    off = worker_groups(render(None, "--set", "admin.enabled=false"))["trunk"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in off["env"]}["MOESERVE_ADMIN_PORT"] == "off"


@pytest.mark.parametrize("sets", [["rayAutoscaler.version=v1"], ["rayAutoscaler.enabled=false"]], ids=["v1", "off"])
def test_worker_idle_timeouts_only_with_autoscaler_v2(render, sets):
    """KubeRay refuses a worker group's idleTimeoutSeconds unless autoscaler v2 runs."""
    assert all("idleTimeoutSeconds" in g for g in worker_groups(render(MULTI_GPU)).values() if g["groupName"] != "experts-h200")
    extra = [a for s in sets for a in ("--set", s)]
    assert not [n for n, g in worker_groups(render(MULTI_GPU, *extra)).items() if "idleTimeoutSeconds" in g]
