"""Trunk workers scaled live (router/trunk_pool.py): a worker added and one drained while requests stream;
every stream ends with the tokens of the undisturbed single-process run."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest

from moeserve.router.config import EngineConfig
from moeserve.router.errors import EngineStoppedError, InvalidRequestError
from moeserve.router.llm_engine import LLMEngine
from moeserve.router.sequence import SamplingParams
from moeserve.router.trunk_pool import TrunkPool

PROMPTS = [[5, 6, 7, 8], [100, 3], [42] * 9, [7, 300, 11, 12, 13], [1, 2, 3], [250, 251, 252]]
MAX_TOKENS = 24


def _config(model: str) -> EngineConfig:
    return EngineConfig(model=model, max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=64)


@pytest.fixture(scope="module")
def reference(ray_cluster, demo_model_dir):
    core = LLMEngine.from_config(_config(str(demo_model_dir)))
    return [o.new_token_ids for o in core.generate_batch(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]


async def _consume(stream, progressed: asyncio.Event) -> tuple[list[int], str]:
    ids, reason = [], None
    async for out in stream:
        ids += out.new_token_ids
        reason = out.finish_reason
        progressed.set()
    return ids, reason


async def _until(predicate, timeout_s: float = 120.0, what: str = "") -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(wait(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"{what or 'the condition'}: not reached in {timeout_s:.0f}s") from None


async def test_trunk_workers_added_and_drained_under_load_lose_nothing(ray_cluster, demo_model_dir, reference):
    pool = TrunkPool(_config(str(demo_model_dir)), replicas=1, max_replicas=3, torch_threads=1)
    await pool.start()
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        assert pool.replicas == 1 and pool.max_model_len > 0
        progressed = asyncio.Event()
        first = [asyncio.create_task(_consume(pool.generate(f"a{i}", p, params), progressed))
                 for i, p in enumerate(PROMPTS)]
        await progressed.wait()
        said = pool.scale(2)
        assert said.startswith("trunk workers: starting 1 (to 2)"), said
        assert pool.replicas == 1 and pool.pending == 1
        await _until(lambda: pool.replicas == 2)
        # Least busy first: the new worker (holding nothing) takes at least half of the next requests.
        second = [asyncio.create_task(_consume(pool.generate(f"b{i}", p, params), progressed))
                  for i, p in enumerate(PROMPTS)]
        newest = max(pool.members(), key=lambda m: m.index)
        assert len(newest.engine.in_flight) >= len(PROMPTS) // 2
        # Drain one at once, while both hold requests: it takes no more and finishes what it holds.
        said = pool.scale(1)
        assert said.startswith("trunk workers: draining 1 (to 1)"), said
        draining = pool.members("draining")
        assert len(draining) == 1 and len(draining[0].engine.in_flight) > 0
        third = [asyncio.create_task(_consume(pool.generate(f"c{i}", p, params), progressed))
                 for i, p in enumerate(PROMPTS)]
        assert not any(f"c{i}" in draining[0].engine.in_flight for i in range(len(PROMPTS)))
        got = await asyncio.wait_for(asyncio.gather(*first, *second, *third), 300)
        await _until(lambda: not pool.members("draining"), what="the drain")
        assert got == [(ids, "length") for ids in reference * 3]
        assert pool.replicas == 1 and len(pool.members()) == 1
        assert any(re.fullmatch(r"trunk worker #\d+ drained: the [1-9]\d* request\(s\) it held when asked to leave "
                                r"finished there; 1 serving", e) for e in pool.events), pool.events
        stats = pool.stats()
        # The drained worker's counters stay in the sums.
        assert stats["requests_finished"] == 3 * len(PROMPTS), stats
        assert stats["tokens_generated"] == 3 * len(PROMPTS) * MAX_TOKENS, stats
        assert stats["requests_in_flight"] == 0 and stats["kv_blocks_used"] == 0, stats
        assert stats["trunk_workers"] == 1 and stats["trunk_workers_draining"] == 0, stats
    finally:
        await pool.shutdown(0)


async def test_trunk_pool_refuses_what_it_cannot_do(ray_cluster, demo_model_dir):
    pool = TrunkPool(_config(str(demo_model_dir)), replicas=1, max_replicas=2, torch_threads=1)
    await pool.start()
    try:
        with pytest.raises(ValueError, match=r"trunk workers: must be in \[1, 2\], got 0"):
            pool.scale(0)
        with pytest.raises(ValueError, match=r"got 3"):
            pool.scale(3)
        assert pool.scale(1) == "trunk workers: already 1"
        stream = pool.generate("same", PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        with pytest.raises(InvalidRequestError, match="already in flight"):
            pool.generate("same", PROMPTS[1], SamplingParams(max_tokens=4))
        pool.abort("same")
        outs = [out async for out in stream]
        assert outs[-1].finish_reason == "cancelled"
    finally:
        await pool.shutdown(0)
    with pytest.raises(ValueError, match="must be >= 1"):
        TrunkPool(_config(str(demo_model_dir)), replicas=0)
    # No worker can start (the KV cache cannot hold max_model_len): start says why instead of waiting.
    bad = dataclasses.replace(_config(str(demo_model_dir)), num_kv_blocks=1, max_model_len=4096)
    broken = TrunkPool(bad, replicas=1, torch_threads=1)
    with pytest.raises(EngineStoppedError, match="no trunk worker could start: .*max_model_len"):
        await asyncio.wait_for(broken.start(), 120)
    assert not broken.members() and any("failed to start" in e for e in broken.events)


async def test_requests_sharing_a_prefix_go_to_the_worker_that_cached_it(ray_cluster, demo_model_dir):
    """Two idle workers: a prompt's first request goes to one, and the requests that begin with its two whole KV
    blocks follow it there (while it is not much busier) and read those blocks from its cache. Each token's
    logprobs come through the worker with it."""
    system = list(range(100, 140))  # two whole blocks of 16 and 8 tokens more
    prompts = [system + [1]] + [system + [i, i] for i in range(2, 6)]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    want = [o.new_token_ids for o in LLMEngine.from_config(_config(str(demo_model_dir))).generate_batch(prompts, params)]
    pool = TrunkPool(_config(str(demo_model_dir)), replicas=2, max_replicas=2, torch_threads=1)
    await pool.start()
    try:
        await _until(lambda: pool.replicas == 2)
        outs = [o async for o in pool.generate("p0", prompts[0], params)]
        got = [[t for out in outs for t in out.new_token_ids]]
        assert outs[-1].cached_prompt_tokens == 0
        owner = pool.affinity.choose(pool.affinity.keys(prompts[1]), {m.index: 0 for m in pool.members()})
        assert owner is not None
        streams = [pool.generate(f"p{i}", p, params) for i, p in enumerate(prompts[1:], 1)]
        (held,) = [m for m in pool.members() if m.index == owner]
        assert set(held.engine.in_flight) == {f"p{i}" for i in range(1, len(prompts))}  # none to the idle one
        for stream in streams:
            outs = [o async for o in stream]
            got.append([t for out in outs for t in out.new_token_ids])
            assert outs[-1].cached_prompt_tokens == 32  # the system prompt's two blocks, from the worker's cache
            for out in outs:  # greedy: each token is the most likely one
                assert [(lp[1][0], lp[0], len(lp[2])) for lp in out.logprobs] == [(t, lp[2][0], 2) for t, lp in
                                                                                  zip(out.new_token_ids, out.logprobs)]
        assert got == want
        await _until(lambda: pool.stats()["prefix_cache_hit_tokens"] >= 4 * 32, what="the hits reported")
        assert pool.stats()["requests_routed_by_prefix"] == 4
    finally:
        await pool.shutdown(0)


async def test_least_busy_routing_ignores_prefixes(ray_cluster, demo_model_dir):
    """--trunk-routing least-busy: the requests sharing a prefix spread over both workers by load alone."""
    system = list(range(100, 140))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    pool = TrunkPool(_config(str(demo_model_dir)), replicas=2, max_replicas=2, torch_threads=1, prefix_routing=False)
    await pool.start()
    try:
        await _until(lambda: pool.replicas == 2)
        assert pool.affinity is None
        outs = [o async for o in pool.generate("p0", system + [1], params)]
        streams = [pool.generate(f"p{i}", system + [i, i], params) for i in range(1, 5)]
        assert sorted(len(m.engine.in_flight) for m in pool.members()) == [2, 2]
        for stream in streams:
            outs = [o async for o in stream]
            assert outs[-1].finished
        assert pool.stats()["requests_routed_by_prefix"] == 0
    finally:
        await pool.shutdown(0)
