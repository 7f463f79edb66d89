"""Live changes of the serving set while 32 requests are in flight: add a replica, remove one,
replicate a hot expert, drain a group. Every request completes with the undisturbed run's tokens.

The engine is stepped here, one step at a time, while each change runs in another thread: at most
MAX_STEPS_PER_CHANGE steps pass per change, so every change happens with all 32 requests mid-stream
whatever the machine's speed.
"""

from __future__ import annotations

import threading

import ray
import torch

from moeserve.cluster.controller import ControllerConfig, start_controller
from moeserve.cluster.telemetry import Telemetry
from moeserve.experts.backend import ray_expert_backend
from moeserve.experts.group import GroupResources
from moeserve.experts.weights import CheckpointWeights
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

NUM_REQUESTS, MAX_TOKENS, MAX_STEPS_PER_CHANGE = 32, 40, 4


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 24, (NUM_REQUESTS,), generator=g)]


def _engine(path: str, backend=None) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=256, block_size=8, max_num_seqs=NUM_REQUESTS,
                                              load_experts=backend is None, expert_backend=backend))


class _Change(threading.Thread):
    """One controller call, run beside the engine's steps."""

    def __init__(self, call):
        super().__init__(daemon=True)
        self.call, self.result, self.error = call, None, None

    def run(self) -> None:
        try:
            self.result = ray.get(self.call())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_changes_under_load_lose_nothing(ray_cluster, hf_checkpoint):
    path = str(hf_checkpoint("deepseek_v3"))
    base = _engine(path)
    prompts = _prompts(base.model_config.vocab_size)
    params = SamplingParams(max_tokens=MAX_TOKENS)
    want = [o.new_token_ids for o in base.generate_batch(prompts, params)]

    cfg = ControllerConfig(weights=CheckpointWeights(path), num_experts=8, num_groups=2, name="live",
                           namespace="test-live-scaling", resources=GroupResources(num_cpus=0.1, torch_threads=1))
    controller = start_controller(cfg)
    engine = _engine(path, ray_expert_backend(controller))
    dispatcher = engine.model.experts_backend
    telemetry = Telemetry()
    dispatcher.attach_telemetry(telemetry)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(NUM_REQUESTS)}
    reasons: dict[str, str] = {}

    def step() -> None:
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason

    def hot_expert() -> int:
        load = ray.get(controller.status.remote())["expert_load"]
        return max(load, key=lambda e: (load[e], -e))

    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        for _ in range(3):
            step()
        epoch0 = dispatcher.epoch
        hot = hot_expert()
        changes = [
            ("add a replica of group 0", lambda: controller.add_replica.remote(0)),
            ("remove replica g0r0", lambda: controller.drain.remote(replica_id="g0r0")),
            (f"replicate hot expert {hot}", lambda: controller.replicate_expert.remote(hot)),
            ("drain group 1", lambda: controller.drain.remote(group_id=1)),
        ]
        for name, call in changes:
            change = _Change(call)
            change.start()
            for _ in range(MAX_STEPS_PER_CHANGE):
                if not change.is_alive():
                    break
                step()
            change.join()
            assert change.error is None, f"{name}: {change.error!r}"
            assert not reasons, f"requests finished before '{name}' was done: pick longer requests"
        status = ray.get(controller.status.remote())
        while engine.has_unfinished():
            step()
        scaling_events = telemetry.snapshot()["scaling_events"]
    finally:
        telemetry.shutdown()
        dispatcher.close()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)

    assert reasons == {f"r{i}": "length" for i in range(NUM_REQUESTS)}
    assert [got[f"r{i}"] for i in range(NUM_REQUESTS)] == want
    assert dispatcher.epoch >= epoch0 + 4 and dispatcher.counters["epochs_adopted"] >= 4
    assert scaling_events["action=epoch_adopted"] == dispatcher.counters["epochs_adopted"]
    [group] = status["groups"]  # group 1 drained; its experts moved to group 0
    assert group["group_id"] == 0 and sorted(group["experts"]) == list(range(8))
    assert [r["replica_id"] for r in group["replicas"] if r["serving"]] == ["g0r1"]
    assert status["unavailable_experts"] == []
