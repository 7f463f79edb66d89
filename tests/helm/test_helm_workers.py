"""The Ray side of the chart: worker groups and the resources they offer (as Ray's own KubeRay code reads
them), the serving entrypoint run through bash against stand-ins of `ray` and `moeserve` with its
flags parsed by the real `moeserve serve` parser, the head, probes and idle timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from chart_harness import CHART, FULLNAME, MINIMAL, MULTI_GPU, TLS_AUTH_MON, by_kind, one, worker_groups


def kuberay_start_command(params: dict[str, str], head: bool, forces_block: bool = True) -> str:
    """The `ray start` line KubeRay puts in $KUBERAY_GEN_RAY_START_CMD: ` --key=value` per parameter,
    "true" as a bare flag and "false" left out, values pasted in as they are. KubeRay 1.1+ (kuberay#1718,
    the versions the chart supports) puts --block in whatever rayStartParams say; older ones honour
    block: "false" (`forces_block=False`)."""
    params = {**params, "block": "true"} if forces_block else {"block": "true", **params}
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
    import argparse

    from moeserve.cluster.cli import serve  # only this command: other commands' imports stay out of the way

    parser = argparse.ArgumentParser(prog="moeserve")
    serve.register(parser.add_subparsers(dest="command"))
    assert argv[0] == "serve"
    args, unknown = parser.parse_known_args(argv)
    return args, unknown


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
    from moeserve.experts.group import check_resource_template

    objects = render(values)
    trunk = worker_groups(objects)["trunk"]
    (container,) = trunk["template"]["spec"]["containers"]
    ray_argv, serve_argv = run_container(container, kuberay_start_command(trunk["rayStartParams"], head=False), tmp_path)
    assert "--block" not in ray_argv, "ray start must return so the edge can start"
    assert ray_resources(ray_argv) == {"moeserve_trunk": 1}
    assert "--num-gpus=0" in ray_argv

    args, unknown = parse_serve(serve_argv)
    assert not unknown, f"the chart passes arguments `moeserve serve` does not have: {unknown}"
    assert (args.host, args.port) == ("0.0.0.0", 50051)
    assert args.transport == "ray"
    cm_path = "/etc/moeserve/autoscaling/policy.yaml"
    assert args.autoscaling_policy == cm_path
    assert args.expert_resource == "moeserve_expert_{group}"
    check_resource_template(args.expert_resource, field="--expert-resource")  # what serve checks before it starts
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == args.port
    assert ports["metrics"] == args.prometheus_port and args.prometheus_host == "0.0.0.0"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert os.path.dirname(cm_path) in mounts
    if values == MULTI_GPU:
        assert args.expert_groups == 16 and args.model == "/models/DeepSeek-V3" and args.max_model_len == 32768
        assert (args.speculative_tokens, args.ngram_min, args.ngram_max) == (3, 2, 3)
        assert "/models" in mounts
    elif values == TLS_AUTH_MON:
        assert args.tls_cert and args.tls_key and args.tls_client_ca and args.auth_token_file
        assert args.otlp_endpoint == "http://otel-collector.observability:4317"
        for flag in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            assert os.path.dirname(getattr(args, flag)) in mounts, flag
    else:
        assert args.expert_groups == 2 and args.model is None
    if values != MULTI_GPU:
        assert args.speculative_tokens == 0


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


@pytest.mark.parametrize("sets", [["rayAutoscaler.version=v1"], ["rayAutoscaler.enabled=false"]], ids=["v1", "off"])
def test_worker_idle_timeouts_only_with_autoscaler_v2(render, sets):
    """KubeRay refuses a worker group's idleTimeoutSeconds unless autoscaler v2 runs."""
    assert all("idleTimeoutSeconds" in g for g in worker_groups(render(MULTI_GPU)).values() if g["groupName"] != "experts-h200")
    extra = [a for s in sets for a in ("--set", s)]
    assert not [n for n, g in worker_groups(render(MULTI_GPU, *extra)).items() if "idleTimeoutSeconds" in g]
