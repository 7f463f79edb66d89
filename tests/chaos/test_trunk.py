"""Trunk-worker failover: the worker process dies mid-stream; every stream ends with the undisturbed tokens."""

from __future__ import annotations

import asyncio

import pytest

from moeserve.router.config import EngineConfig
from moeserve.router.llm_engine import LLMEngine
from moeserve.router.sequence import SamplingParams
from moeserve.router.trunk import TrunkEngine

PROMPTS = [[5, 6, 7, 8], [100, 3], [42] * 9, [7, 300, 11, 12, 13], [1, 2, 3], [250, 251, 252]]


def _config(model: str) -> EngineConfig:
    return EngineConfig(model=model, max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=64)


@pytest.fixture(scope="module")
def reference(ray_cluster, demo_model_dir):
    """Greedy outputs (tokens, text) of every prompt with and without a stop string, in one process."""
    core = LLMEngine.from_config(_config(str(demo_model_dir)))
    plain = core.generate_batch(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    stop = plain[0].new_text[6:9]  # a stop string the first completion is known to contain
    stopped = core.generate_batch(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)))
    return stop, [(o.new_token_ids, o.new_text, o.finish_reason) for o in plain + stopped]


async def _consume(stream, seen: list[int], progressed: asyncio.Event, need: int):
    ids, text, reason = [], [], None
    async for out in stream:
        ids += out.new_token_ids
        text.append(out.new_text)
        reason = out.finish_reason
        if len(ids) == need:
            seen.append(1)
            progressed.set()
    return ids, "".join(text), reason


async def test_worker_death_loses_nothing(ray_cluster, demo_model_dir, reference):
    stop, want = reference
    engine = TrunkEngine(_config(str(demo_model_dir)))
    await engine.start()
    try:
        params = [SamplingParams(max_tokens=24, ignore_eos=True)] * len(PROMPTS)
        params += [SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,))] * len(PROMPTS)
        seen: list[int] = []
        progressed = asyncio.Event()
        tasks = []
        for i, (prompt, p) in enumerate(zip(PROMPTS + PROMPTS, params)):
            stream = engine.generate(f"r{i}", prompt, p)
            tasks.append(asyncio.create_task(_consume(stream, seen, progressed, need=3)))
        # Kill once every stream that will reach 3 tokens before its stop string has done so.
        while len(seen) < len(PROMPTS):
            progressed.clear()
            await progressed.wait()
        first = engine.worker
        import ray

        ray.kill(first)
        got = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        assert engine.restarts == 1 and engine.worker is not first
        assert engine.resubmitted > 0, "the worker died after every request had finished: nothing was tested"
        assert got == want
        assert engine.stats()["requests_in_flight"] == 0
    finally:
        await engine.shutdown(0)


async def test_without_restarts_the_streams_fail(ray_cluster, demo_model_dir):
    """The control: with failover off, the same kill ends the request with an error (what failover saves)."""
    from moeserve.router.errors import EngineStoppedError

    engine = TrunkEngine(_config(str(demo_model_dir)), max_restarts=0)
    await engine.start()
    try:
        stream = engine.generate("r0", PROMPTS[0], SamplingParams(max_tokens=900, ignore_eos=True))
        first = await stream.__anext__()
        assert first.new_token_ids and not first.finished
        import ray

        ray.kill(engine.worker)
        with pytest.raises(EngineStoppedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineStoppedError):
            engine.generate("r1", PROMPTS[1], SamplingParams(max_tokens=4))
    finally:
        await engine.shutdown(0)
