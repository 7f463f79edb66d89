"""trunk.mode workers: the head runs the one gRPC edge (`moeserve serve --trunk-workers N --trunk-resource
NAME`) after `ray start --head` returns, the trunk pods are plain Ray workers offering the resource (and
their GPUs), so a trunk worker the policy adds and no pod can take becomes a trunk pod; the Services,
NetworkPolicy and NOTES point at the head. trunk.mode edge (the default) renders exactly as without it."""

from __future__ import annotations

import os

import pytest

from chart_harness import (CHART, CI_VALUES, FULLNAME, MULTI_GPU, NAMESPACE, RELEASE, TLS_AUTH_MON, TRUNK_WORKERS,
                           by_kind, one, run_helm, worker_groups)
from test_helm_workers import autoscaler_node_types, kuberay_start_command, parse_serve, ray_resources, run_container

WORKERS = ("--set", "trunk.mode=workers")
GLOO = ("--set", "server.transport=gloo")
NO_PREFIX_CACHING = ("--set", "server.prefixCaching=false")
LEAST_BUSY = ("--set", "trunk.routing=least-busy")
# (values file, extra helm args): the CI file of the mode, and the GPU and TLS examples switched to it (the GPU
# one also to the gloo transport, the TLS one without prefix caching and with least-busy routing).
CASES = [(TRUNK_WORKERS, ()), (MULTI_GPU, WORKERS + GLOO), (TLS_AUTH_MON, WORKERS + NO_PREFIX_CACHING + LEAST_BUSY)]
IDS = ["trunk-workers", "multi-gpu+workers+gloo", "tls-auth-monitoring+workers-prefix-caching"]


def head_spec(objects) -> dict:
    (cluster,) = by_kind(objects, "RayCluster")
    return cluster["spec"]["headGroupSpec"]


@pytest.mark.parametrize("values,extra", CASES, ids=IDS)
@pytest.mark.parametrize("kuberay", ["forces-block", "honours-block-false"])
def test_head_starts_ray_then_serves_with_trunk_workers(render, values, extra, kuberay, tmp_path):
    from moeserve.cluster.cli.serve import trunk_workers
    from moeserve.experts.group import check_resource_template

    objects = render(values, *extra)
    head = head_spec(objects)
    pod = head["template"]["spec"]
    (container,) = pod["containers"]
    start_cmd = kuberay_start_command(head["rayStartParams"], head=True, forces_block=kuberay == "forces-block")
    ray_argv, serve_argv = run_container(container, start_cmd, tmp_path)
    assert ray_argv[:2] == ["start", "--head"] and "--num-cpus=0" in ray_argv
    assert "--block" not in ray_argv, "ray start must return so the edge can start"
    assert serve_argv is not None, "the head must run the edge"

    args, unknown = parse_serve(serve_argv)
    assert not unknown, f"the chart passes arguments `moeserve serve` does not have: {unknown}"
    trunk = worker_groups(objects)["trunk"]
    assert args.trunk_workers == trunk["replicas"] and trunk_workers(args) == trunk["replicas"]  # serve's own checks
    assert args.trunk_resource == "moeserve_trunk"
    assert (args.host, args.port, args.transport) == ("0.0.0.0", 50051, "gloo" if GLOO[1] in extra else "ray")
    assert args.prefix_caching is (NO_PREFIX_CACHING[1] not in extra)
    assert args.trunk_routing == ("least-busy" if LEAST_BUSY[1] in extra else "prefix")
    check_resource_template(args.expert_resource, field="--expert-resource")

    # Everything the edge needs is on the head now.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == args.port and ports["metrics"] == args.prometheus_port
    assert {"gcs-server", "dashboard", "client"} <= ports.keys()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_ADDRESS"]["value"] == "auto" and "MOESERVE_ADMIN_PORT" in env
    assert pod["terminationGracePeriodSeconds"] == 30 + 15
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert os.path.dirname(args.autoscaling_policy) in mounts and "/dev/shm" in mounts
    assert "checksum/autoscaling" in head["template"]["metadata"]["annotations"]  # a new policy rolls the head
    if values == MULTI_GPU:
        assert args.model == "/models/DeepSeek-V3" and "/models" in mounts  # the edge reads config.json, tokenizer.json
        assert args.device == "cuda" and "nvidia.com/gpu" not in str(container["resources"])  # workers hold the GPUs
    if values == TLS_AUTH_MON:
        for flag in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            assert os.path.dirname(getattr(args, flag)) in mounts, flag
        assert container["readinessProbe"]["exec"]["command"][1] == "/etc/moeserve/probe/grpc_health_probe.py"
        assert "MOESERVE_ADMIN_TOKEN" not in env  # no admin tokens in this example
    else:
        assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "moeserve.v1.Inference"}


@pytest.mark.parametrize("values,extra", CASES, ids=IDS)
def test_trunk_pods_only_run_ray_and_offer_the_resource(render, values, extra, tmp_path):
    objects = render(values, *extra)
    trunk = worker_groups(objects)["trunk"]
    pod = trunk["template"]["spec"]
    (container,) = pod["containers"]
    ray_argv, serve_argv = run_container(container, kuberay_start_command(trunk["rayStartParams"], head=False), tmp_path)
    assert serve_argv is None and "--block" in ray_argv  # like the expert pods
    assert ray_resources(ray_argv) == {"moeserve_trunk": 1}
    gpus = {TRUNK_WORKERS: 0, MULTI_GPU: 8, TLS_AUTH_MON: 1}[values]
    assert f"--num-gpus={gpus}" in ray_argv
    assert container["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    for edge_only in ("ports", "startupProbe", "readinessProbe", "livenessProbe"):
        assert edge_only not in container
    assert "terminationGracePeriodSeconds" not in pod
    assert {v["name"] for v in pod["volumes"]} <= {"dshm", "model"}
    assert "checksum/autoscaling" not in trunk["template"]["metadata"].get("annotations", {})
    given = {"trunk-workers": (1, 1, 3, 120), "multi-gpu": (2, 2, 6, 600), "tls-auth-monitoring": (1, 1, 4, 600)}
    name = values.name.removesuffix("-values.yaml")
    assert (trunk["replicas"], trunk["minReplicas"], trunk["maxReplicas"], trunk["idleTimeoutSeconds"]) == given[name]
    if values == MULTI_GPU:
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
        assert {"key": "dedicated", "operator": "Equal", "value": "moeserve-trunk", "effect": "NoSchedule"} in pod["tolerations"]
        assert "/models" in {m["mountPath"] for m in container["volumeMounts"]}  # the workers load the trunk's weights


@pytest.mark.parametrize("values,extra", CASES, ids=IDS)
def test_a_waiting_trunk_worker_is_demand_for_a_trunk_pod(render, values, extra, tmp_path):
    """What a trunk worker asks Ray for (TrunkWorker's num_cpus, one GPU on CUDA, one unit of --trunk-resource:
    serve's _trunk_pool) fits exactly the trunk node type of Ray's autoscaler, within trunk min/max pods."""
    from moeserve.router.trunk_worker import TrunkWorker

    objects = render(values, *extra)
    head = head_spec(objects)
    _, serve_argv = run_container(head["template"]["spec"]["containers"][0],
                                  kuberay_start_command(head["rayStartParams"], head=True), tmp_path)
    args, _ = parse_serve(serve_argv)
    demand = {"CPU": TrunkWorker._default_options["num_cpus"], "GPU": 1 if args.device.startswith("cuda") else 0,
              args.trunk_resource: 1}
    types = autoscaler_node_types(objects)
    fits = [name for name, t in types.items() if all(t["resources"].get(k, 0) >= v for k, v in demand.items() if v)]
    assert fits == ["trunk"]
    trunk = worker_groups(objects)["trunk"]
    assert (types["trunk"]["min_workers"], types["trunk"]["max_workers"]) == (trunk["minReplicas"], trunk["maxReplicas"])
    assert types["headgroup"]["resources"]["CPU"] == 0  # the edge is a driver; nothing model-side lands on the head


@pytest.mark.parametrize("values,extra", CASES, ids=IDS)
def test_services_and_policies_select_the_head(render, values, extra):
    objects = render(values, *extra)
    head_labels = head_spec(objects)["template"]["metadata"]["labels"]
    group_labels = {n: g["template"]["metadata"]["labels"] for n, g in worker_groups(objects).items()}

    def selects_only_head(selector: dict) -> bool:
        return selector.items() <= head_labels.items() and not any(selector.items() <= l.items() for l in group_labels.values())

    svc = one(objects, "Service", FULLNAME)
    assert selects_only_head(svc["spec"]["selector"]) and svc["metadata"]["labels"]["app.kubernetes.io/component"] == "head"
    metrics = one(objects, "Service", f"{FULLNAME}-metrics")
    assert selects_only_head(metrics["spec"]["selector"])
    policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
    assert selects_only_head(policies[f"{FULLNAME}-grpc"]["spec"]["podSelector"]["matchLabels"])
    if values == TLS_AUTH_MON:
        monitor = one(objects, "ServiceMonitor")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    # The trunk pods keep their budget (one evicted at a time); the head, which now runs the edge, has none.
    pdbs = {p["metadata"]["name"]: p for p in by_kind(objects, "PodDisruptionBudget")}
    if pdbs:
        selector = pdbs[f"{FULLNAME}-trunk"]["spec"]["selector"]["matchLabels"]
        assert [n for n, l in group_labels.items() if selector.items() <= l.items()] == ["trunk"]
        assert not any(p["spec"]["selector"]["matchLabels"].items() <= head_labels.items() for p in pdbs.values())


@pytest.mark.parametrize("values", [None, *[v for v in CI_VALUES if v != TRUNK_WORKERS]],
                         ids=["defaults", *[v.name.removesuffix("-values.yaml") for v in CI_VALUES if v != TRUNK_WORKERS]])
def test_edge_mode_is_the_default_and_unchanged(render, values, tmp_path):
    objects = render(values)
    assert objects == render(values, "--set", "trunk.mode=edge")
    head = head_spec(objects)
    assert "block" not in head["rayStartParams"] and "ports" in head["template"]["spec"]["containers"][0]
    assert {p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]} == {"gcs-server", "dashboard", "client"}
    trunk = worker_groups(objects)["trunk"]
    _, serve_argv = run_container(trunk["template"]["spec"]["containers"][0],
                                  kuberay_start_command(trunk["rayStartParams"], head=False), tmp_path)
    args, _ = parse_serve(serve_argv)
    assert args.trunk_workers == 0 and args.trunk_resource is None  # every trunk pod runs its own edge
    assert one(objects, "Service", FULLNAME)["spec"]["selector"]["app.kubernetes.io/component"] == "trunk"


def test_cuda_workers_need_gpus_on_trunk_pods(helm):
    from chart_harness import HelmFailed

    with pytest.raises(HelmFailed, match="trunk.gpus: 0, but in trunk.mode workers with server.device cuda"):
        run_helm(helm, "template", RELEASE, str(CHART), "--set", "trunk.mode=workers", "--set", "trunk.gpus=0")
    run_helm(helm, "template", RELEASE, str(CHART), "-f", str(TRUNK_WORKERS))  # cpu: no GPUs needed


def test_notes_point_at_the_head(helm):
    out = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                   "-f", str(TRUNK_WORKERS))
    notes = out.split("NOTES:", 1)[1]
    assert "the gRPC\n   edge runs on the head" in notes
    assert "app.kubernetes.io/component=head" in notes and "component=trunk" not in notes
    assert "Trunk workers: 1 at start, then as the policy decides" in notes and "(1..3 trunk pods)" in notes
    assert f"port-forward svc/{FULLNAME} 50051:50051" in notes
