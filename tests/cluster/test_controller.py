"""The controller as a restartable Ray actor, and how a drain waits for in-flight rows and for every
dispatcher to adopt the new epoch (and for no dispatcher that is gone)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import ray
import torch

from moeserve.cluster.controller import ControllerConfig, start_controller
from moeserve.cluster.epoch import ControllerSource
from moeserve.experts.backend import ray_expert_backend
from moeserve.experts.group import GroupResources
from moeserve.experts.weights import CheckpointWeights
from moeserve.kernels import ops
from moeserve.models.loader import load_expert_weights
from moeserve.router.dispatch import ExpertDispatcher
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams
from moeserve.router.transport.ray import RayTransport
from moeserve.router.trunk import TrunkEngine
from moeserve.router.trunk_pool import TrunkPool

NAMESPACE = "test-controller"
RESOURCES = GroupResources(num_cpus=0.1, torch_threads=1)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the groups (torch_threads=1): equal bits, no OpenMP pools spinning on 2 cores
    ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False, namespace=NAMESPACE)
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


def _until(predicate, what: str, timeout_s: float = 60.0) -> None:
    """Poll `predicate` (a status read: the controller has no wait for it) until true, at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout_s:.0f}s"
        time.sleep(0.1)


def _dispatchers(controller) -> int:
    return ray.get(controller.status.remote(), timeout=60)["dispatchers"]


def _config(path: str, name: str, **overrides) -> ControllerConfig:
    fields = {"num_experts": 8, **overrides}
    return ControllerConfig(weights=CheckpointWeights(path), name=name, namespace=NAMESPACE, resources=RESOURCES,
                            **fields)


def test_config_errors_name_the_field(tmp_path):
    src = CheckpointWeights(str(tmp_path))
    with pytest.raises(ValueError, match=r"num_groups: must be in 1..8"):
        ControllerConfig(weights=src, num_experts=8, num_groups=9)
    with pytest.raises(ValueError, match="replicas_per_group"):
        ControllerConfig(weights=src, num_experts=8, replicas_per_group=0)
    with pytest.raises(ValueError, match="drain_timeout_s"):
        ControllerConfig(weights=src, num_experts=8, drain_timeout_s=0)
    with pytest.raises(ValueError, match="num_gpus"):
        GroupResources(num_gpus=-1)


def test_restarted_controller_recovers_its_groups(ray_cluster, hf_checkpoint):
    path = str(hf_checkpoint("mixtral"))
    controller = start_controller(_config(path, "restart", num_experts=4))
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=64, block_size=8, load_experts=False,
                                                expert_backend=ray_expert_backend(controller)))
    prompts, params = [[5, 6, 7], [1, 2, 3, 4, 5, 6]], SamplingParams(max_tokens=6)
    try:
        before = ray.get(controller.status.remote())
        first = [o.new_token_ids for o in engine.generate_batch(prompts, params)]
        ray.kill(controller, no_restart=False)  # Ray restarts it; it reads its state back from the GCS
        # ray.kill returns before the actor is gone: a call right after may still reach the old instance
        deadline, after = time.monotonic() + 120, before
        while after["epoch"] == before["epoch"]:
            assert time.monotonic() < deadline, "the controller was not restarted within 120 s"
            try:
                after = ray.get(controller.status.remote(), timeout=120)
            except ray.exceptions.RayActorError:  # the call reached the dying instance
                time.sleep(0.1)
        second = [o.new_token_ids for o in engine.generate_batch(prompts, params)]
    finally:
        engine.model.experts_backend.close()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
    assert second == first
    assert after["epoch"] == before["epoch"] + 1
    pids = lambda s: {r["replica_id"]: (r["pid"], r["incarnation"]) for g in s["groups"] for r in g["replicas"]}
    assert [g["experts"] for g in after["groups"]] == [g["experts"] for g in before["groups"]]
    assert {r: inc for r, (_, inc) in pids(after).items()} == {"g0r0": 0, "g1r0": 0}  # found again, not restarted


def test_drain_finishes_rows_in_flight_and_waits_for_adoption(ray_cluster, hf_checkpoint):
    path = str(hf_checkpoint("qwen3_moe"))
    controller = start_controller(_config(path, "drain", num_groups=1, replicas_per_group=2))
    source = ControllerSource(controller, dispatcher_id="d0")
    dispatcher = ExpertDispatcher(source, RayTransport(), [0, 2], num_experts=8)
    w = load_expert_weights(path, list(range(8)))
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(12, 64, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(12)])
    weights = torch.rand(12, 2, generator=g)
    want = {layer: ops.fused_experts(hidden, *w[layer], ids, weights) for layer in (0, 2)}
    drained: list = []
    try:
        epoch = dispatcher.epoch
        pending = dispatcher.submit(0, hidden, ids, weights)  # a step begins on both replicas
        busy = {r for r in (p.replica_id for p in pending.outstanding)}
        assert busy == {"g0r0", "g0r1"}
        drain = threading.Thread(target=lambda: drained.append(ray.get(controller.drain.remote(replica_id="g0r0"))))
        drain.start()
        moved = ray.get(controller.watch.remote("observer", epoch, 60.0))  # returns once the set changed
        ray.get(controller.forget_dispatcher.remote("observer"))
        assert moved is not None and moved.placement.all_replicas() == ("g0r1",)
        assert dispatcher.epoch == epoch  # mid-step: the old set stays until the step ends
        assert torch.equal(pending.wait(), want[0])
        assert torch.equal(dispatcher(2, hidden, ids, weights), want[2])  # the step's last MoE layer
        drain.join()
        assert drained == [["g0r0"]] and dispatcher.epoch == moved.epoch
        assert torch.equal(dispatcher(0, hidden, ids, weights), want[0])  # the next step, on g0r1 alone
        assert dispatcher.serving.placement.all_replicas() == ("g0r1",)
    finally:
        dispatcher.close()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)


def test_a_dispatcher_gone_silent_is_forgotten_and_no_drain_waits_for_it(ray_cluster, hf_checkpoint):
    """One that polled once and then went silent (its process died without a word) leaves status() once its
    dispatcher_ttl_s has passed, and a drain ends then, not at drain_timeout_s; a live one stays and is waited for.
    A forgotten one's late poll does not bring it back."""
    path = str(hf_checkpoint("mixtral"))
    controller = start_controller(_config(path, "silent", num_experts=4, num_groups=1, replicas_per_group=2,
                                          dispatcher_ttl_s=3.0, drain_timeout_s=600.0))
    live = ControllerSource(controller, dispatcher_id="live")
    adopted: list[int] = []
    try:
        epoch = live.current().epoch
        assert ray.get(controller.watch.remote("gone", epoch, 0.1)) is None  # its one poll, at the current epoch
        live.subscribe(lambda serving: (adopted.append(serving.epoch), live.ack(serving.epoch)))
        _until(lambda: _dispatchers(controller) == 1, "the silent dispatcher forgotten, the live one kept")
        # No one tells the controller that "gone" went: only its own clock lets the drain end.
        drained = ray.get(controller.drain.remote(replica_id="g0r1"), timeout=120)
        assert drained == ["g0r1"] and adopted == [epoch + 1]  # the live one adopted the drain's epoch
        assert _dispatchers(controller) == 1
        # A poll that reaches the controller after its dispatcher was forgotten (sent by a worker just before it
        # was killed) is answered, but does not register the dead dispatcher again.
        ray.get(controller.forget_dispatcher.remote("late"))
        assert ray.get(controller.watch.remote("late", epoch, 0.1)) is not None  # the epoch moved: the set
        assert _dispatchers(controller) == 1
    finally:
        live.close()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)


async def test_a_killed_trunk_workers_dispatcher_is_forgotten_at_once(ray_cluster, hf_checkpoint):
    """The pool restarts a killed trunk worker and has the controller forget the dead one's dispatcher: only the
    new worker's is registered, and a drain does not wait for the dead one (its TTL here is ten minutes)."""
    path = str(hf_checkpoint("mixtral"))
    controller = start_controller(_config(path, "trunk-killed", num_experts=4, num_groups=1, replicas_per_group=2,
                                          dispatcher_ttl_s=600.0, drain_timeout_s=600.0))
    config = EngineConfig(model=path, num_kv_blocks=64, block_size=8, load_experts=False,
                          expert_backend=ray_expert_backend(controller))
    pool = TrunkPool(config, replicas=1, torch_threads=1)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        await pool.start()
        assert await asyncio.to_thread(_dispatchers, controller) == 1
        (member,) = pool.members()
        first = pool.worker
        ray.kill(first, no_restart=True)
        await asyncio.wait_for(member.engine.wait_restarts(1), 120)
        assert pool.worker is not first
        await asyncio.to_thread(_until, lambda: _dispatchers(controller) == 1, "the new worker's dispatcher alone")
        drained = await asyncio.wait_for(controller.drain.remote(replica_id="g0r1"), 120)
        assert drained == ["g0r1"]
        outs = [out async for out in pool.generate("after", [5, 6, 7], params)]  # served by g0r0 alone
        assert outs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outs) == 4
    finally:
        await pool.shutdown(0)
        ray.get(controller.shutdown.remote())
        ray.kill(controller)


async def test_a_trunk_worker_that_fails_to_start_leaves_no_dispatcher(ray_cluster, hf_checkpoint):
    """A worker whose expert dispatcher registered (it does so on creation) and which then failed to start (a KV
    cache budget too small for one block, found after the model and its dispatcher were built) is killed, and the
    edge has the controller forget the dispatcher it named for it: none is left, and a drain does not wait for
    it (its TTL here is ten minutes)."""
    path = str(hf_checkpoint("mixtral"))
    controller = start_controller(_config(path, "trunk-start-fails", num_experts=4, num_groups=1, replicas_per_group=2,
                                          dispatcher_ttl_s=600.0, drain_timeout_s=600.0))
    config = EngineConfig(model=path, kv_cache_memory_bytes=1, block_size=8, load_experts=False,
                          expert_backend=ray_expert_backend(controller))
    engine = TrunkEngine(config, torch_threads=1)
    try:
        with pytest.raises(Exception, match="KV cache budget holds no block"):
            await engine.start()
        await asyncio.to_thread(_until, lambda: _dispatchers(controller) == 0, "the failed worker's dispatcher gone",
                                20.0)
        drained = await asyncio.wait_for(controller.drain.remote(replica_id="g0r1"), 120)
        assert drained == ["g0r1"]
    finally:
        await engine.shutdown(0)
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
