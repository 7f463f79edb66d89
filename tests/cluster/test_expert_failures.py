"""Expert groups that die or stall mid-stream lose no request; one that cannot be restored gives an
error naming the unavailable experts instead of a hang."""

from __future__ import annotations

import asyncio

import pytest
import ray
import torch

from moeserve.cluster.controller import ControllerConfig, start_controller
from moeserve.experts.backend import ray_expert_backend
from moeserve.experts.group import GroupResources
from moeserve.experts.weights import CheckpointWeights
from moeserve.router.dispatch import DispatchConfig
from moeserve.router.engine import AsyncEngine, EngineConfig, LLMEngine, SamplingParams, StepFailedError
from moeserve.router.errors import ExpertsUnavailableError

NAMESPACE = "test-expert-failures"
NUM_REQUESTS, MAX_TOKENS = 32, 32
RESOURCES = GroupResources(num_cpus=0.1, torch_threads=1)


@pytest.fixture(scope="module")
def model(ray_cluster, hf_checkpoint):
    """(checkpoint path, prompts, the undisturbed single-process outputs)."""
    path = str(hf_checkpoint("qwen3_moe"))
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (NUM_REQUESTS,), generator=g)]
    base = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=256, block_size=8, max_num_seqs=NUM_REQUESTS))
    want = [o.new_token_ids for o in base.generate_batch(prompts, SamplingParams(max_tokens=MAX_TOKENS))]
    return path, prompts, want


def _controller(path: str, name: str, **overrides):
    cfg = ControllerConfig(weights=CheckpointWeights(path), num_experts=8, num_groups=2, name=name, namespace=NAMESPACE,
                           resources=RESOURCES, **overrides)
    return start_controller(cfg)


def _engine_config(path: str, controller, dispatch: DispatchConfig | None = None, transport: str = "ray") -> EngineConfig:
    return EngineConfig(model=path, num_kv_blocks=256, block_size=8, max_num_seqs=NUM_REQUESTS, load_experts=False,
                        expert_backend=ray_expert_backend(controller, config=dispatch, transport=transport))


async def _stream_with_fault(engine: AsyncEngine, prompts, fault) -> tuple[list[list[int]], list[str]]:
    """Stream every prompt; once each has its first token, run `fault()` (all still mid-stream)."""
    started = [asyncio.Event() for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str] = [""] * len(prompts)

    async def consume(i: int, stream) -> None:
        async for out in stream:
            outputs[i] += out.new_token_ids
            started[i].set()
            if out.finished:
                reasons[i] = out.finish_reason

    streams = [engine.generate(f"r{i}", p, SamplingParams(max_tokens=MAX_TOKENS)) for i, p in enumerate(prompts)]
    tasks = [asyncio.create_task(consume(i, s)) for i, s in enumerate(streams)]
    await asyncio.gather(*(e.wait() for e in started))
    assert not any(reasons), "a request finished before the fault; use longer requests"
    await asyncio.to_thread(fault)
    await asyncio.gather(*tasks)
    return outputs, reasons


@pytest.mark.parametrize("transport", ["ray", "gloo"])
async def test_killed_group_mid_stream_loses_no_request(ray_cluster, model, transport):
    path, prompts, want = model
    controller = _controller(path, f"killed-{transport}")
    engine = AsyncEngine(LLMEngine.from_config(_engine_config(path, controller, transport=transport)))
    await engine.start()
    try:
        victim = ray.get_actor(f"killed-{transport}-g1r0-0", namespace=NAMESPACE)
        outputs, reasons = await _stream_with_fault(engine, prompts, lambda: ray.kill(victim, no_restart=True))
        status = ray.get(controller.status.remote())
    finally:
        await engine.shutdown()
        engine.core.model.experts_backend.close()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
    assert reasons == ["length"] * NUM_REQUESTS
    assert outputs == want
    [g1r0] = status["groups"][1]["replicas"]
    assert g1r0["incarnation"] == 1 and g1r0["restarts"] == 1 and g1r0["state"] == "serving"


@pytest.mark.parametrize("transport", ["ray", "gloo"])
async def test_stalled_group_is_replaced_and_requests_go_on(ray_cluster, model, transport):
    path, prompts, want = model
    controller = _controller(path, f"stalled-{transport}")
    dispatch = DispatchConfig(timeout_s=3.0, recovery_timeout_s=120.0)
    engine = AsyncEngine(LLMEngine.from_config(_engine_config(path, controller, dispatch, transport)))
    await engine.start()
    try:
        victim = ray.get_actor(f"stalled-{transport}-g0r0-0", namespace=NAMESPACE)
        outputs, reasons = await _stream_with_fault(engine, prompts, lambda: ray.get(victim.inject_delay.remote(600.0)))
        status = ray.get(controller.status.remote())
        counters = dict(engine.core.model.experts_backend.counters)
    finally:
        await engine.shutdown()
        engine.core.model.experts_backend.close()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
    assert reasons == ["length"] * NUM_REQUESTS
    assert outputs == want
    assert counters["recoveries"] >= 1
    assert status["groups"][0]["replicas"][0]["incarnation"] == 1


def test_unrestorable_group_names_its_experts(ray_cluster, model):
    path, prompts, _ = model
    controller = _controller(path, "lost", max_restarts=0)
    engine = LLMEngine.from_config(_engine_config(path, controller, DispatchConfig(timeout_s=5.0, recovery_timeout_s=30.0)))
    try:
        ray.kill(ray.get_actor("lost-g1r0-0", namespace=NAMESPACE), no_restart=True)
        with pytest.raises(StepFailedError) as err:
            engine.generate_batch(prompts[:4], SamplingParams(max_tokens=4))
        status = ray.get(controller.status.remote())
    finally:
        engine.model.experts_backend.close()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
    cause = err.value.cause
    assert isinstance(cause, ExpertsUnavailableError), repr(cause)
    assert cause.experts and set(cause.experts) <= {4, 5, 6, 7}
    assert "moeserve status" in str(cause)
    assert status["unavailable_experts"] == [4, 5, 6, 7]
