"""The Kubernetes objects around the RayCluster select and carry what they should: the gRPC Service,
PodDisruptionBudgets, NetworkPolicies, the autoscaler's Role, Secrets, the Admin API and NOTES.txt."""

from __future__ import annotations

import shlex
from pathlib import Path


from chart_harness import CHART, FULLNAME, MULTI_GPU, NAMESPACE, RELEASE, TLS_AUTH_MON, by_kind, one, run_helm, worker_groups


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


def test_the_http_api_is_off_by_default_and_reachable_when_on(render, tmp_path):
    from test_helm_workers import parse_serve

    off = render(TLS_AUTH_MON, "--set", "server.toolCallFormat=hermes")
    assert [p["name"] for p in one(off, "Service", FULLNAME)["spec"]["ports"]] == ["grpc"]
    (container,) = worker_groups(off)["trunk"]["template"]["spec"]["containers"]
    serve = shlex.split(next(a for a in container["args"] if "moeserve" in a and " serve " in a).split(" serve ", 1)[1])
    args, unknown = parse_serve(["serve", *serve])  # gRPC's Chat reads the call format too
    assert not unknown and args.http_port is None and args.tool_call_format == "hermes"
    objects = render(TLS_AUTH_MON, "--set", "server.httpPort=8080", "--set", "service.httpPort=80",
                     "--set", "server.toolCallFormat=deepseek_v3", "--set", "server.reasoningContent=keep")
    svc = one(objects, "Service", FULLNAME)
    assert svc["spec"]["ports"][1] == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP",
                                       "appProtocol": "http"}
    (container,) = worker_groups(objects)["trunk"]["template"]["spec"]["containers"]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    serve = shlex.split(next(a for a in container["args"] if "moeserve" in a and " serve " in a).split(" serve ", 1)[1])
    args, unknown = parse_serve(["serve", *serve])
    assert not unknown and args.http_port == 8080 and args.tls_cert  # the HTTP API gets the gRPC port's TLS
    assert args.tool_call_format == "deepseek_v3" and args.reasoning_content == "keep"
    policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
    assert {"port": "http", "protocol": "TCP"} in policies[f"{FULLNAME}-grpc"]["spec"]["ingress"][0]["ports"]


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


def test_notes_tell_how_to_call_the_edge(helm):
    out = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                   "-f", str(TLS_AUTH_MON))
    notes = out.split("NOTES:", 1)[1]
    assert f"port-forward svc/{FULLNAME} 50051:50051" in notes
    assert "--tls-ca" in notes and "--auth-token-file" in notes
    assert "--tls-cert" in notes  # the edge asks for client certificates (tls.clientAuth)
    assert f"PrometheusRule {FULLNAME}" in notes
    shlex.split(notes.split("moeserve generate", 1)[1].splitlines()[0])  # a command line that parses
