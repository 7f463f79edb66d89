"""The Admin gRPC service and `moeserve status / scale / drain`, against a real controller on real Ray."""

from __future__ import annotations

import pytest
import ray
import torch

from moeserve.cluster.admin_server import ADMIN_TOKEN_ENV, AdminConfig, AdminServer
from moeserve.cluster.cli import main as cli
from moeserve.cluster.controller import ControllerConfig, start_controller
from moeserve.experts.backend import ray_expert_backend
from moeserve.experts.group import GroupResources
from moeserve.experts.weights import CheckpointWeights
from moeserve.router.auth import TOKEN_ENV
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

NAMESPACE = "test-admin"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(shared_ray, hf_checkpoint):
    """(controller, admin address) with some traffic already served, so the load is not empty."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the groups (torch_threads=1): equal bits, no OpenMP pools spinning on 2 cores
    path = str(hf_checkpoint("deepseek_v3"))
    controller = start_controller(ControllerConfig(
        weights=CheckpointWeights(path), num_experts=8, num_groups=2, name="adm", namespace=NAMESPACE,
        resources=GroupResources(num_cpus=0.1, torch_threads=1)))
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=64, block_size=8, load_experts=False,
                                                expert_backend=ray_expert_backend(controller)))
    engine.generate_batch([[1, 2, 3, 4], [9, 8, 7]], SamplingParams(max_tokens=4))
    engine.model.experts_backend.close()
    server = AdminServer(controller, AdminConfig(port=0, tokens=(ADMIN_TOKEN,))).start()
    yield controller, server.address
    server.stop()
    ray.get(controller.shutdown.remote())
    ray.kill(controller)
    torch.set_num_threads(threads)


def _run(capsys, monkeypatch, argv, token=ADMIN_TOKEN):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, token)
    code = cli(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_shows_groups_replicas_experts_load_and_epoch(cluster, capsys, monkeypatch):
    controller, address = cluster
    code, out, _ = _run(capsys, monkeypatch, ["status", "--address", address])
    assert code == 0, out
    epoch = ray.get(controller.epoch.remote())
    assert f"epoch {epoch}" in out
    assert "group 0  experts 0 1 2 3" in out and "group 1  experts 4 5 6 7" in out
    assert "replica g0r0" in out and "replica g1r0" in out and "serving" in out
    load = ray.get(controller.status.remote())["expert_load"]
    assert sum(load.values()) == 2 * 2 * (4 + 3 + 3 * 2)  # 2 MoE layers x top-2 x (prefills + 3 decodes each)
    hot = max(load, key=load.get)
    assert any(line.split()[:3] == [str(hot), "0" if hot < 4 else "1", str(load[hot])] for line in out.splitlines())
    code, js, _ = _run(capsys, monkeypatch, ["status", "--address", address, "--json"])
    assert code == 0 and '"replicaId": "g1r0"' in js


def test_scale_replicate_and_drain_through_the_cli(cluster, capsys, monkeypatch):
    controller, address = cluster
    code, out, _ = _run(capsys, monkeypatch, ["scale", "--address", address, "--group", "0", "--replicas", "2"])
    assert code == 0 and "group 0: replicas g0r0 g0r1" in out, out
    code, out, _ = _run(capsys, monkeypatch, ["scale", "--address", address, "--expert", "2", "--group", "1"])
    assert code == 0 and "expert 2: extra replica in group 1" in out, out
    code, out, _ = _run(capsys, monkeypatch, ["drain", "--address", address, "--replica", "g0r0"])
    assert code == 0 and "drained g0r0" in out, out
    status = ray.get(controller.status.remote())
    assert status["groups"][1]["experts"] == [4, 5, 6, 7, 2]
    assert [r["replica_id"] for r in status["groups"][0]["replicas"]] == ["g0r1"]
    code, out, err = _run(capsys, monkeypatch, ["drain", "--address", address, "--group", "7"])
    assert code == 1 and "FAILED_PRECONDITION" in err and "group 7 is not placed" in err


def test_bad_flags_name_the_field(cluster, capsys, monkeypatch):
    _, address = cluster
    code, out, _ = _run(capsys, monkeypatch, ["scale", "--address", address, "--group", "0", "--replicas", "0"])
    assert code == 2 and "--replicas: must be >= 1" in out
    code, out, _ = _run(capsys, monkeypatch, ["drain", "--address", address])
    assert code == 2 and "exactly one of --group G or --replica R" in out
    code, out, _ = _run(capsys, monkeypatch, ["scale", "--address", address, "--trunk-workers", "0"])
    assert code == 2 and "--trunk-workers: must be >= 1, got 0" in out
    code, out, _ = _run(capsys, monkeypatch, ["scale", "--address", address, "--trunk-workers", "2", "--group", "0"])
    assert code == 2 and "--trunk-workers goes alone" in out
    # This admin API has no edge beside it, so no trunk workers to scale.
    code, _, err = _run(capsys, monkeypatch, ["scale", "--address", address, "--trunk-workers", "2"])
    assert code == 1 and "FAILED_PRECONDITION" in err and "serve --trunk-workers N" in err, err


def test_admin_needs_the_admin_token(cluster, capsys, monkeypatch):
    _, address = cluster
    code, _, err = _run(capsys, monkeypatch, ["status", "--address", address], token="")
    assert code == 1 and "UNAUTHENTICATED" in err
    monkeypatch.setenv(TOKEN_ENV, "inference-token-0123456789")  # an inference token is not an admin token
    code, _, err = _run(capsys, monkeypatch, ["status", "--address", address], token="inference-token-0123456789")
    assert code == 1 and "UNAUTHENTICATED" in err


def test_admin_config_is_validated():
    with pytest.raises(ValueError, match="admin port: must be in 0..65535"):
        AdminConfig(port=70000)


def test_admin_config_from_env(monkeypatch):
    monkeypatch.setenv("MOESERVE_ADMIN_PORT", "0")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "tok-aaaaaaaaaaaaaaaa, tok-bbbbbbbbbbbbbbbb")
    cfg = AdminConfig.from_env()
    assert cfg.port == 0 and cfg.host == "127.0.0.1" and cfg.tokens == ("tok-aaaaaaaaaaaaaaaa", "tok-bbbbbbbbbbbbbbbb")
    monkeypatch.setenv("MOESERVE_ADMIN_PORT", "fifty")
    with pytest.raises(ValueError, match="MOESERVE_ADMIN_PORT: must be a port number"):
        AdminConfig.from_env()
