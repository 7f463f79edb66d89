"""Trunk-worker failover: the worker dies, or stalls, mid-stream; every stream ends with the undisturbed tokens."""

from __future__ import annotations

import asyncio
import math
import time
import types

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
    """Greedy outputs (tokens, text) of every prompt without a stop string, with one, and with one kept in the text,
    in one process."""
    core = LLMEngine.from_config(_config(str(demo_model_dir)))
    plain = core.generate_batch(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    stop = plain[0].new_text[6:9]  # a stop string the first completion is known to contain
    stopped = core.generate_batch(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)))
    kept = core.generate_batch(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,),
                                                       include_stop_str_in_output=True))
    assert kept[0].new_text == stopped[0].new_text + stop
    return stop, [(o.new_token_ids, o.new_text, o.finish_reason) for o in plain + stopped + kept]


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
        # Kill once every stream that will reach 3 tokens before its stop string has done so.
        tasks = await _start_streams(engine, stop)
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


async def _start_streams(engine: TrunkEngine, stop: str) -> list[asyncio.Task]:
    """Every prompt without the stop string, with it, and with it kept; returns once each has streamed its first 3 tokens
    (those that reach 3 before their stop string)."""
    params = [SamplingParams(max_tokens=24, ignore_eos=True)] * len(PROMPTS)
    params += [SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,))] * len(PROMPTS)
    params += [SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,), include_stop_str_in_output=True)] * \
        len(PROMPTS)
    seen: list[int] = []
    progressed = asyncio.Event()
    tasks = []
    for i, (prompt, p) in enumerate(zip(PROMPTS * 3, params)):
        stream = engine.generate(f"r{i}", prompt, p)
        tasks.append(asyncio.create_task(_consume(stream, seen, progressed, need=3)))
    while len(seen) < len(PROMPTS):
        progressed.clear()
        await progressed.wait()
    return tasks


async def test_resubmitted_sampling_goes_on_exactly(ray_cluster, demo_model_dir):
    """Seeded sampling with every penalty and min_tokens, the worker killed once each stream has some tokens (and
    none is done): the restarted worker goes on from the same output and generator state, so every stream ends
    with the undisturbed run's tokens."""
    from moeserve.router.structured import StructuredOutput

    params = [SamplingParams(max_tokens=32, ignore_eos=True, temperature=0.9, top_k=50, seed=100 + i,
                             presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.2, min_tokens=10,
                             logit_bias={7: 2.0, 11: -3.0})
              for i in range(len(PROMPTS))]
    # and structured outputs: the new worker's matcher is fed the streamed tokens first
    prompts = PROMPTS + PROMPTS[:2]
    params += [SamplingParams(max_tokens=40, temperature=0.9, seed=200 + i,
                              structured_output=StructuredOutput("regex", "[a-z ]{40,80}")) for i in range(2)]
    want = [o.new_token_ids for o in LLMEngine.from_config(_config(str(demo_model_dir))).generate_batch(prompts, params)]
    engine = TrunkEngine(_config(str(demo_model_dir)))
    await engine.start()
    try:
        # the worker builds its grammar compiler on its first structured request: not while the others race ahead
        [_ async for _ in engine.generate("warm", prompts[-1], params[-1])]
        seen: list[int] = []
        progressed = asyncio.Event()
        tasks = [asyncio.create_task(_consume(engine.generate(f"s{i}", prompt, p), seen, progressed, need=3))
                 for i, (prompt, p) in enumerate(zip(prompts, params))]
        while len(seen) < len(prompts):
            progressed.clear()
            await progressed.wait()
        import ray

        ray.kill(engine.worker)
        got = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        assert engine.restarts == 1 and engine.resubmitted == len(prompts), "each stream should have been cut"
        assert [ids for ids, _, _ in got] == want
    finally:
        await engine.shutdown(0)


async def test_prompt_logprobs_and_structured_output_through_a_worker(ray_cluster, demo_model_dir, tmp_path):
    """What only the worker knows reaches the edge: the prompt's log-probabilities with the first token, and the end
    of a structured output whose grammar stops on an end-of-sequence only the tokenizer names ("stop")."""
    import json
    import shutil

    from moeserve.router.structured import StructuredOutput

    params = SamplingParams(max_tokens=6, prompt_logprobs=2, logprobs=1)
    choice = SamplingParams(max_tokens=10, structured_output=StructuredOutput("choice", choices=("yes", "no")))
    want = LLMEngine.from_config(_config(str(demo_model_dir))).generate_batch([PROMPTS[3], PROMPTS[0]], [params, choice])
    engine = TrunkEngine(_config(str(demo_model_dir)))
    await engine.start()
    try:
        outs = [o async for o in engine.generate("scored", PROMPTS[3], params)]
        assert [o.prompt_logprobs is not None for o in outs] == [True] + [False] * (len(outs) - 1)
        got = outs[0].prompt_logprobs
        assert len(got) == 4 and [e[1] for e in got] == [e[1] for e in want[0].prompt_logprobs]
        assert [e[0] for e in got] == pytest.approx([e[0] for e in want[0].prompt_logprobs], abs=1e-5)
        outs = [o async for o in engine.generate("choice", PROMPTS[0], choice)]
        assert [t for o in outs for t in o.new_token_ids] == want[1].new_token_ids and outs[-1].finish_reason == "eos"
    finally:
        await engine.shutdown(0)
    # a copy of the demo model whose config names no end-of-sequence: the worker alone sees the grammar end
    path = tmp_path / "demo"
    shutil.copytree(demo_model_dir, path)
    for name in ("config.json", "generation_config.json"):
        if (path / name).exists():
            cfg = json.loads((path / name).read_text())
            cfg.pop("eos_token_id", None)
            (path / name).write_text(json.dumps(cfg))
    engine = TrunkEngine(_config(str(path)))
    await engine.start()
    try:
        outs = [o async for o in engine.generate("choice", PROMPTS[0], choice)]
        assert outs[-1].finished and outs[-1].finish_reason == "stop"
        assert "".join(o.new_text for o in outs) in ("yes", "no")
    finally:
        await engine.shutdown(0)


async def test_stalled_worker_is_restarted(ray_cluster, demo_model_dir, reference):
    """A worker whose steps stop (its actor still answers polls) is killed after stall_timeout_s without a
    step, restarted, and its requests resubmitted: every stream ends with the undisturbed tokens."""
    stop, want = reference
    engine = TrunkEngine(_config(str(demo_model_dir)), stall_timeout_s=2.0)
    await engine.start()
    try:
        tasks = await _start_streams(engine, stop)
        first = engine.worker
        await first.inject_delay.remote(60.0)  # each step now sleeps 60 s first; polls still answer
        stalled_at = time.monotonic()
        # Without stall detection nothing ends the 60 s sleep: this times out.
        await asyncio.wait_for(engine.wait_restarts(1), 45)
        detected_after = time.monotonic() - stalled_at
        got = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert engine.stalls == 1 and engine.restarts == 1 and engine.worker is not first
        assert engine.resubmitted > 0, "every request had finished before the stall: nothing was tested"
        assert detected_after >= 2.0
        assert got == want
        stats = engine.stats()
        assert stats["trunk_stalls"] == 1 and stats["trunk_restarts"] == 1 and stats["requests_in_flight"] == 0
    finally:
        await engine.shutdown(0)


async def test_idle_worker_is_not_taken_for_stalled(ray_cluster, demo_model_dir, reference):
    """No requests, no steps: with a stall timeout far below the idle time the worker is left alone, and
    a request arriving after the idle spell is served by the same worker."""
    stop, want = reference
    engine = TrunkEngine(_config(str(demo_model_dir)), stall_timeout_s=0.5)
    await engine.start()
    try:
        first = engine.worker
        await asyncio.sleep(2.0)  # 8 empty polls (0.25 s each), 4 stall timeouts, no traffic
        assert engine.stalls == 0 and engine.restarts == 0 and engine.worker is first
        stream = engine.generate("late", PROMPTS[0], SamplingParams(max_tokens=24, ignore_eos=True))
        ids = [t async for out in stream for t in out.new_token_ids]
        assert ids == want[0][0]
        await asyncio.sleep(1.0)  # idle again after a request
        assert engine.stalls == 0 and engine.restarts == 0 and engine.worker is first
        assert engine.stats()["trunk_stalls"] == 0
    finally:
        await engine.shutdown(0)


def test_stall_clock(demo_model_dir, monkeypatch):
    """The stall check after each poll, without Ray: idle never fires, a request arriving at an idle
    worker restarts the clock, a step restarts it, and a stalled worker is killed once."""
    import ray

    from moeserve.router import trunk

    killed = []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.append(actor))
    engine = TrunkEngine(_config(str(demo_model_dir)), stall_timeout_s=2.0)
    actor = types.SimpleNamespace(submit=types.SimpleNamespace(remote=lambda *args: None))
    engine._actor, engine._incarnation, engine.max_model_len = actor, 1, 1000
    engine._ready.set()

    def poll(steps: int, idle_s: float = 0.0) -> None:
        """A poll that reports `steps`, `idle_s` seconds after the last time the clock restarted."""
        engine._step_clock -= idle_s
        engine._stats = {"steps": steps}
        engine._check_stall(actor)

    poll(0, idle_s=100.0)  # idle for long: nothing held, nothing done
    assert not killed and engine.stalls == 0
    engine._step_clock -= 100.0  # more idle time, no poll since
    engine.generate("a", PROMPTS[0], SamplingParams(max_tokens=4))  # the clock starts now, not 100 s ago
    poll(0)
    assert not killed
    poll(1, idle_s=3.0)  # it stepped: progress, whatever the time since
    assert not killed
    poll(1, idle_s=1.5)
    assert not killed  # 1.5 s without a step, under the 2 s timeout
    poll(1, idle_s=1.0)  # 2.5 s without a step while holding "a"
    assert killed == [actor] and engine.stalls == 1
    poll(1, idle_s=10.0)  # the killed actor may still answer once: it is not killed twice
    assert killed == [actor] and engine.stalls == 1
    assert engine.stats()["trunk_stalls"] == 1
    assert trunk._MIN_POLL_S <= engine._poll_s == 1.0


@pytest.mark.parametrize("bad", [0, -1.0, math.nan])
def test_stall_timeout_must_be_positive(demo_model_dir, bad):
    with pytest.raises(ValueError, match="stall_timeout_s: must be > 0"):
        TrunkEngine(_config(str(demo_model_dir)), stall_timeout_s=bad)


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
