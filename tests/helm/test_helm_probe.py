"""The TLS health probe the chart renders, run as the kubelet would against a real mTLS edge."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from chart_harness import CHART, by_kind

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))
from edge_harness import make_certs, running_server  # noqa: E402  (the edge tests' real server and certificates)

from moeserve.router.tls import ServerTLS  # noqa: E402


def probe_commands(render) -> dict[str, list[str]]:
    objects = render(CHART / "ci" / "tls-auth-monitoring-values.yaml", "--set", "tls.serverName=localhost")
    (cluster,) = by_kind(objects, "RayCluster")
    (trunk,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "trunk"]
    (container,) = trunk["template"]["spec"]["containers"]
    return {p: container[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}


def localise(command: list[str], tls_dir: Path, port: int) -> list[str]:
    """The container's paths and port mapped onto this machine; the checker is the chart's own file."""
    out = []
    for arg in command:
        arg = arg.replace("/etc/moeserve/tls/", f"{tls_dir}/")
        arg = arg.replace("/etc/moeserve/probe/grpc_health_probe.py", str(CHART / "files" / "grpc_health_probe.py"))
        if arg.startswith("--port="):
            arg = f"--port={port}"
        out.append(arg)
    assert out[0] == "python"
    return [sys.executable, *out[1:]]


async def exit_code(command: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 60)


@pytest.mark.asyncio
async def test_tls_probes_pass_on_a_serving_mtls_edge_and_fail_otherwise(render, tmp_path):
    certs = make_certs(tmp_path / "certs")
    # The Secret's layout (kubernetes.io/tls plus ca.crt), as mounted at /etc/moeserve/tls.
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(certs.server_cert, secret / "tls.crt")
    shutil.copy(certs.server_key, secret / "tls.key")
    shutil.copy(certs.ca, secret / "ca.crt")
    commands = probe_commands(render)

    tls = ServerTLS(str(secret / "tls.crt"), str(secret / "tls.key"), client_ca=str(secret / "ca.crt"))
    async with running_server(tls=tls) as srv:
        port = int(srv.address.rsplit(":", 1)[1])
        for name, command in commands.items():
            assert await exit_code(localise(command, secret, port)) == 0, name
        # A probe that trusts another CA must not pass: the check really verifies the server.
        stranger = tmp_path / "stranger"
        shutil.copytree(secret, stranger)
        shutil.copy(certs.other_ca, stranger / "ca.crt")
        assert await exit_code(localise(commands["readinessProbe"], stranger, port)) == 1
    assert await exit_code(localise(commands["livenessProbe"], secret, port)) == 1  # the edge is gone
