"""Ray's own autoscaler turns expert-group replicas and trunk workers into nodes: the fake multi-node provider
on this machine.

`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config tests/cluster/fake_cluster/autoscaling.yaml`
(its own temp dir and free ports). Expert-group replicas ask for one `moeserve_expert` each; the head
offers one, an `expert_worker` node offers one more. Traffic rises: the target-utilisation policy,
run by AutoscaleRunner on the controller's live metrics, adds replicas; they stay pending until Ray's
autoscaler adds expert_worker nodes; then they serve. Traffic stops: the policy drains replicas
back to the minimum and the autoscaler removes the idle nodes. Every request completes. Trunk workers
(router/trunk_pool.py) do the same with `moeserve_trunk` and a trunk_worker node type.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from moeserve.cluster.autoscaling import parse_config
from moeserve.cluster.autoscaling.live import trunk_from_engine_stats
from moeserve.cluster.autoscaling.runner import AutoscaleRunner
from moeserve.cluster.controller import ControllerConfig, start_controller
from moeserve.experts.backend import ray_expert_backend
from moeserve.experts.group import GroupResources
from moeserve.experts.weights import CheckpointWeights
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).parent / "fake_cluster" / "autoscaling.yaml"
NAMESPACE = "test-fake-multinode"
RESOURCE = "moeserve_expert"
MAX_REPLICAS = 3  # the head's one slot plus two expert_worker nodes
MAX_SEQS = 6
log = logging.getLogger("test_fake_multinode")

POLICY = {
    "policy": "target_utilisation",
    "interval_s": 1.0,
    "window_s": 4.0,
    # Any real traffic keeps the group well above 0.5% busy, even on a loaded machine where the
    # trunk steps slowly: the policy asks for the maximum, and for the minimum once the window
    # holds no traffic.
    "params": {"expert_busy": 0.005, "tolerance": 0.0},
    "limits": {
        "trunk": {"min_replicas": 1, "max_replicas": 1},
        "expert_groups": {"min_replicas": 1, "max_replicas": MAX_REPLICAS},
        "upscale_delay_s": 0,
        "downscale_delay_s": 3,
        "max_step_up": 2,
        "max_step_down": 1,
    },
    "redundant_experts": {"enabled": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class FakeCluster:
    """A Ray head with the fake multi-node autoscaler, in its own process group; stop() ends all of it."""

    def __init__(self, config: Path, auth_mode: str = "disabled"):
        self.dir = Path(tempfile.mkdtemp(prefix="msfake-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.ip = ray._private.services.get_node_ip_address()
        self.port = _free_port()
        self.address = f"{self.ip}:{self.port}"
        cfg = yaml.safe_load(config.read_text())
        cfg["provider"]["gcs_address"] = self.address  # fake nodes join this head, not 6379
        self.config_file = self.dir / "autoscaling.yaml"
        self.config_file.write_text(yaml.safe_dump(cfg))
        head = cfg["available_node_types"]["ray.head.default"]["resources"]
        self.env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE=auth_mode)
        ray_cli = str(Path(sys.executable).with_name("ray"))
        self.cmd = [
            ray_cli, "start", "--head", "--block", f"--port={self.port}", f"--temp-dir={self.dir}",
            "--include-dashboard=false", f"--dashboard-port={_free_port()}", "--disable-usage-stats",
            f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--num-cpus={head['CPU']}", "--resources=" + json.dumps({k: v for k, v in head.items() if k != "CPU"}),
            f"--autoscaling-config={self.config_file}",
        ]
        self.proc: subprocess.Popen | None = None
        self.log_lines: list[str] = []

    def start(self, timeout_s: float = 120.0) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        started = threading.Event()

        def pump() -> None:  # the head's output goes to the test log; its "started" line is the signal
            for line in self.proc.stdout:
                self.log_lines.append(line.rstrip())
                if "Ray runtime started" in line:
                    started.set()
            started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(timeout_s) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("ray start --head failed:\n" + "\n".join(self.log_lines[-40:]))

    def autoscaler_events(self) -> list[str]:
        """The event summary lines of Ray's autoscaler (monitor.log): nodes added and removed."""
        path = self.dir / "session_latest" / "logs" / "monitor.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return [line.split(":event_summary:", 1)[1] for line in lines if ":event_summary:" in line]

    def removed(self, node_type: str) -> bool:
        """Whether Ray's autoscaler has logged removing a node of `node_type`."""
        return any("Removing" in line and node_type in line for line in self.autoscaler_events())

    def stop(self) -> None:
        """Kill the head's process group: GCS, raylet, the autoscaler and every fake node it started."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def _expert_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(RESOURCE)
                  and "node:__internal_head__" not in n["Resources"])


def _wait_until(predicate, timeout_s: float, what: str, runner: AutoscaleRunner, work=None) -> None:
    """Re-check `predicate` (doing `work` in between, else pausing briefly) until true or `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            events = "\n".join(f"  {e.kind}: {e.message}" for e in runner.events)
            nodes = [(n["NodeID"][-5:], n["Alive"], n["Resources"].get(RESOURCE)) for n in ray.nodes()]
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; nodes {nodes}; "
                                 f"autoscaler events:\n{events}")
        if work is not None:
            work()
        else:
            pause.wait(0.5)  # the re-check period; the predicate is what the test waits on


def _driver_auth_mode() -> str:
    """The token-auth mode this process's Ray settled on (fixed at its first init), for the head to match."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


@pytest.fixture(scope="module")
def fake_cluster(no_lent_ray):
    """One head for the module's tests: each leaves it as it found it (no expert_worker or trunk_worker
    node, its controller and workers gone), and each looks only at its own node type's autoscaler events."""
    # A local ray.init earlier in this process turns token auth on for the process (token in
    # ~/.ray/auth_token); otherwise it stays off. The head must speak the same.
    mode = _driver_auth_mode()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", mode)
        cluster = FakeCluster(CONFIG, auth_mode=mode)
        cluster.start()
        try:
            ray.init(address=cluster.address, namespace=NAMESPACE, logging_level=logging.WARNING)
            yield cluster
        finally:
            for line in cluster.autoscaler_events():
                log.info("ray autoscaler: %s", line)
            ray.shutdown()
            cluster.stop()


def _head_free(timeout_s: float = 60.0) -> None:
    """Wait until the head's expert and trunk slots are free again: the module's tests share the head,
    and what the previous test killed gives its slot back shortly after."""
    deadline = time.monotonic() + timeout_s
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        held = {r: total.get(r, 0) - free.get(r, 0) for r in (RESOURCE, TRUNK_RESOURCE)}
        if not any(held.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the head's slots still held after {timeout_s:.0f}s: {held}")
        time.sleep(0.2)


def _status(controller) -> dict:
    [group] = ray.get(controller.status.remote(), timeout=30)["groups"]
    return group


def test_traffic_drives_replicas_and_nodes_up_and_back(fake_cluster, hf_checkpoint):
    path = str(hf_checkpoint("deepseek_v3"))
    _head_free()
    controller = start_controller(ControllerConfig(
        weights=CheckpointWeights(path), num_experts=8, num_groups=1, name="fake", namespace=NAMESPACE,
        resources=GroupResources(num_cpus=0, custom_resource=RESOURCE, torch_threads=1),
        load_window_s=4.0, start_timeout_s=180.0, drain_timeout_s=30.0, detached_groups=False,
    ))
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=256, block_size=8, max_num_seqs=MAX_SEQS,
                                                load_experts=False, expert_backend=ray_expert_backend(controller)))
    dispatcher = engine.model.experts_backend
    runner = AutoscaleRunner(controller, parse_config(POLICY),
                             trunk=lambda: trunk_from_engine_stats(engine.stats(), MAX_SEQS))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    timeline: list[str] = []
    t0 = time.monotonic()

    def note(what: str) -> None:
        line = f"t={time.monotonic() - t0:5.1f}s {what}"
        timeline.append(line)
        log.info(line)

    def traffic() -> None:
        """Keep MAX_SEQS requests running and step the engine once."""
        while engine.stats()["running"] + engine.stats()["waiting"] < MAX_SEQS:
            rid = f"r{len(outputs)}"
            outputs[rid] = []
            engine.add_request(rid, [(7 * len(outputs) + j) % 50 + 1 for j in range(8)], params)
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason

    def serving() -> list[dict]:
        return [r for r in _status(controller)["replicas"] if r["serving"]]

    try:
        assert [r["replica_id"] for r in serving()] == ["g0r0"] and _expert_nodes() == []
        note("start: 1 replica on the head, no expert_worker node")
        runner.start()
        # Traffic rises: replicas are asked for, Ray adds expert_worker nodes for them, they serve.
        _wait_until(lambda: len(serving()) == MAX_REPLICAS, 240, f"{MAX_REPLICAS} serving replicas", runner, traffic)
        nodes_up = _expert_nodes()
        note(f"scaled up: {[r['replica_id'] for r in serving()]} on {len(nodes_up)} expert_worker node(s)")
        assert len(nodes_up) == MAX_REPLICAS - 1
        new = {r["replica_id"] for r in serving()} - {"g0r0"}
        placed = {r["replica_id"]: r["node_id"] for r in serving()}
        assert {placed[r] for r in new} == set(nodes_up)  # each new replica on its own new node

        def new_replicas_served() -> bool:
            return all(r["rows"] > 0 for r in serving() if r["replica_id"] in new)

        _wait_until(new_replicas_served, 60, "rows routed to the new replicas", runner, traffic)
        note("the new replicas serve rows")
        # Traffic stops: let every request finish, then the policy drains back to the minimum and
        # Ray removes the idle nodes.
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] += out.new_token_ids
                if out.finished:
                    finished[out.request_id] = out.finish_reason
        note(f"traffic stopped after {len(outputs)} requests")
        _wait_until(lambda: len(serving()) == 1 and not runner.busy, 120, "1 serving replica", runner)
        note(f"scaled down: {[r['replica_id'] for r in serving()]}")
        _wait_until(lambda: _expert_nodes() == [], 120, "the expert_worker nodes to go", runner)
        note("expert_worker nodes removed")
        # monitor.log gets the event summary at the end of the autoscaler's round, which can come
        # after the node shows as gone
        _wait_until(lambda: fake_cluster.removed("expert_worker"), 30, "Ray's autoscaler to log the removal", runner)
    finally:
        runner.stop()
        dispatcher.close()
        ray.get(controller.shutdown.remote(), timeout=60)
        ray.kill(controller)
        for e in runner.events:
            log.info("autoscaler %s: %s", e.kind, e.message)
        autoscaler_log = fake_cluster.autoscaler_events()
        for line in autoscaler_log:
            log.info("ray: %s", line)
        print("\n".join(timeline + [f"autoscaler {e.kind}: {e.message}" for e in runner.events] + autoscaler_log))

    # No request failed: every one ran to its full length.
    assert len(finished) == len(outputs) > MAX_SEQS
    assert set(finished.values()) == {"length"}
    assert all(len(tokens) == params.max_tokens for tokens in outputs.values())
    decisions = [e.message for e in runner.events if e.kind == "decision"]
    assert any(m.startswith("g0 1 -> ") for m in decisions), decisions  # up from the minimum
    assert any(m.startswith("g0 2 -> 1") for m in decisions), decisions
    assert not [e for e in runner.events if e.kind == "failed"]
    assert any("Adding" in line and "expert_worker" in line for line in autoscaler_log)
    assert any("Removing" in line and "expert_worker" in line for line in autoscaler_log)


TRUNK_RESOURCE = "moeserve_trunk"
TRUNK_POLICY = {
    "policy": "target_utilisation",
    "interval_s": 1.0,
    "window_s": 4.0,
    # Batch slots are the only pressure: twice MAX_SEQS requests in flight ask for the second trunk
    # worker; none for the minimum. The expert group stays at one replica.
    "params": {"sequence_slots": 0.75, "trunk_busy": 1.0, "expert_busy": 1.0, "tolerance": 0.0},
    "limits": {
        "trunk": {"min_replicas": 1, "max_replicas": 2},
        "expert_groups": {"min_replicas": 1, "max_replicas": 1},
        "upscale_delay_s": 0,
        "downscale_delay_s": 3,
    },
    "redundant_experts": {"enabled": False},
}


def _trunk_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(TRUNK_RESOURCE)
                  and "node:__internal_head__" not in n["Resources"])


async def _until(predicate, timeout_s: float, what: str, runner: AutoscaleRunner) -> None:
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            events = "\n".join(f"  {e.kind} {e.unit}: {e.message}" for e in runner.events)
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; autoscaler events:\n{events}")
        await asyncio.sleep(0.5)


@pytest.mark.asyncio
async def test_traffic_drives_trunk_workers_and_nodes_up_and_back(fake_cluster, hf_checkpoint):
    """The trunk as the expert groups: trunk workers ask for `moeserve_trunk` (the head offers one, a
    trunk_worker node one more). Queued requests make the policy add a trunk worker; it waits until
    Ray's autoscaler adds a trunk_worker node, then serves; traffic stops, the policy drains it and Ray
    removes the node. Every request completes."""
    import asyncio

    from moeserve.cluster.autoscaling.runner import EngineTrunk
    from moeserve.router.trunk_pool import TrunkPool

    path = str(hf_checkpoint("deepseek_v3"))
    await asyncio.to_thread(_head_free)
    controller = await asyncio.to_thread(start_controller, ControllerConfig(
        weights=CheckpointWeights(path), num_experts=8, num_groups=1, name="fake-trunk", namespace=NAMESPACE,
        resources=GroupResources(num_cpus=0, custom_resource=RESOURCE, torch_threads=1),
        load_window_s=4.0, start_timeout_s=180.0, drain_timeout_s=30.0, detached_groups=False,
    ))
    config = EngineConfig(model=path, num_kv_blocks=256, block_size=8, max_num_seqs=MAX_SEQS, load_experts=False,
                          expert_backend=ray_expert_backend(controller))
    pool = TrunkPool(config, replicas=1, max_replicas=2, torch_threads=1, start_timeout_s=240.0,
                     actor_options={"resources": {TRUNK_RESOURCE: 1}})
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    streams: set[asyncio.Task] = set()
    timeline: list[str] = []
    t0 = time.monotonic()
    runner = None

    def note(what: str) -> None:
        timeline.append(f"t={time.monotonic() - t0:5.1f}s {what}")
        log.info(timeline[-1])

    async def consume(rid: str, stream) -> None:
        async for out in stream:
            outputs[rid] += out.new_token_ids
            if out.finished:
                reasons[rid] = out.finish_reason

    async def traffic(stop: asyncio.Event) -> None:
        """Keep twice the batch slots of one worker in flight until `stop`."""
        while not stop.is_set():
            while len(streams) < 2 * MAX_SEQS:
                rid = f"r{len(outputs)}"
                outputs[rid] = []
                task = asyncio.create_task(consume(rid, pool.generate(
                    rid, [(7 * len(outputs) + j) % 50 + 1 for j in range(8)], params)))
                streams.add(task)
                task.add_done_callback(streams.discard)
            await asyncio.sleep(0.05)

    await pool.start()
    try:
        assert pool.replicas == 1 and _trunk_nodes() == []
        runner = AutoscaleRunner(controller, parse_config(TRUNK_POLICY), trunk=EngineTrunk(pool, window_s=4.0),
                                 scale_trunk=pool.scaler()).start()
        note("start: 1 trunk worker on the head, no trunk_worker node")
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(stop))
        await _until(lambda: pool.replicas == 2, 240, "2 serving trunk workers", runner)
        nodes_up = _trunk_nodes()
        note(f"scaled up: 2 trunk workers, {len(nodes_up)} trunk_worker node(s)")
        assert len(nodes_up) == 1
        newest = max(pool.members(), key=lambda m: m.index)
        await _until(lambda: newest.engine.stats()["requests_finished"] > 0, 60, "the new worker serving", runner)
        note("the new trunk worker serves requests")
        stop.set()
        await load
        await asyncio.wait_for(asyncio.gather(*list(streams)), 120)
        note(f"traffic stopped after {len(outputs)} requests")
        await _until(lambda: pool.replicas == 1 and not pool.members("draining"), 120, "1 trunk worker", runner)
        note("scaled down: 1 trunk worker")
        await _until(lambda: _trunk_nodes() == [], 120, "the trunk_worker node to go", runner)
        note("trunk_worker node removed")
        await _until(lambda: fake_cluster.removed("trunk_worker"), 30, "Ray's autoscaler to log the removal", runner)
    finally:
        if runner is not None:
            runner.stop()
        await pool.shutdown(0)
        await asyncio.to_thread(ray.get, controller.shutdown.remote(), timeout=60)
        ray.kill(controller)
        autoscaler_log = fake_cluster.autoscaler_events()
        events = [f"autoscaler {e.kind} {e.unit}: {e.message}" for e in (runner.events if runner else [])]
        print("\n".join(timeline + events + pool.events + autoscaler_log))

    # No request failed: every one ran to its full length.
    assert len(reasons) == len(outputs) > 2 * MAX_SEQS
    assert set(reasons.values()) == {"length"}
    assert all(len(tokens) == params.max_tokens for tokens in outputs.values())
    trunk = [e.message for e in runner.events if e.unit == "trunk" and e.kind == "decision"]
    assert any(m.startswith("trunk 1 -> 2") for m in trunk) and any(m.startswith("trunk 2 -> 1") for m in trunk), trunk
    assert not [e for e in runner.events if e.kind == "failed"]
    assert any("Adding" in line and "trunk_worker" in line for line in autoscaler_log), autoscaler_log
    assert any("Removing" in line and "trunk_worker" in line for line in autoscaler_log), autoscaler_log
