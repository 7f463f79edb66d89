"""Telemetry across the trunk worker: what the worker's engine and experts report reaches the edge's
Telemetry, and the edge's counters survive the worker's death."""

from __future__ import annotations

import asyncio
import pickle
import time


from moeserve.cluster.telemetry import Telemetry
from moeserve.router.config import EngineConfig
from moeserve.router.sequence import SamplingParams
from moeserve.router.trunk import WORKER_COUNTERS, TrunkEngine
from moeserve.router.trunk_worker import TelemetryRelay

PROMPTS = [[5, 6, 7, 8], [100, 3], [42] * 9, [7, 300, 11, 12, 13]]


def _config(model: str, **overrides) -> EngineConfig:
    return EngineConfig(model=model, max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=64, **overrides)


async def _run(engine, prefix: str, max_tokens: int = 6) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        ids = []
        async for out in engine.generate(f"{prefix}{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)):
            ids += out.new_token_ids
        return ids

    return await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))), 120)


def _count(tel: Telemetry, name: str) -> int:
    hist = tel.histograms(name).get(name)
    return sum(hist.counts) if hist is not None else 0


# -- the relay alone ---------------------------------------------------------------------------------

def test_relay_is_bounded_and_counts_what_it_drops():
    relay = TelemetryRelay(limit=10)
    for i in range(25):
        relay.record_step(i / 1000, i)
    relay.record_queue_wait(0.5)  # one more sample: the oldest step goes
    for _ in range(1000):  # many adds to one series: summed, not kept one by one
        relay.expert_tokens.add(2, {"layer": 1, "expert": 3})
    for expert in range(20):  # 20 series past 9 free ones: 11 dropped
        relay.scaling_events.add(1, {"action": f"a{expert}"})
    records, dropped = relay.drain()
    assert len(records) == 20  # 10 samples + 10 counter series
    samples = records[:10]
    assert samples[:-1] == [("step", i / 1000, i) for i in range(16, 25)]
    assert samples[-1] == ("queue_wait", 0.5)
    assert ("expert_tokens", 2000, {"layer": 1, "expert": 3}) in records
    assert sum(1 for r in records if r[0] == "scaling_events") == 9
    assert dropped == 16 + 11
    assert pickle.loads(pickle.dumps(records)) == records
    assert relay.drain() == ([], 0)  # drained: nothing held, the dropped count restarts


def test_replayed_records_reach_the_observer_and_none_drops_them(demo_model_dir):
    engine = TrunkEngine(_config(str(demo_model_dir)))  # not started: no worker, only the replay
    records = [("step", 0.01, 4), ("queue_wait", 0.2), ("expert_tokens", 5, {"layer": 1, "expert": 0}),
               ("scaling_events", 1, {"action": "epoch_adopted"})]
    engine._replay(records, 0)  # no observer yet: dropped

    class Plain:  # only the engine's two calls: the counter records are skipped
        def __init__(self):
            self.calls = []

        def record_step(self, seconds, num_tokens):
            self.calls.append(("step", seconds, num_tokens))

        def record_queue_wait(self, seconds):
            self.calls.append(("queue_wait", seconds))

    plain = Plain()
    engine.observe(plain)
    engine._replay(records, 3)
    assert plain.calls == [("step", 0.01, 4), ("queue_wait", 0.2)]
    assert engine.telemetry_dropped == 3

    tel = Telemetry()
    try:
        engine.observe(tel)
        engine._replay(records, 0)
        snap = tel.snapshot()
        assert snap["step_seconds"]["count"] == 1 and snap["queue_wait_seconds"]["count"] == 1
        assert snap["expert_tokens"] == {"expert=0,layer=1": 5}
        assert snap["scaling_events"] == {"action=epoch_adopted": 1}
    finally:
        tel.shutdown()


# -- through a real worker ---------------------------------------------------------------------------

async def test_step_times_and_queue_waits_reach_the_edge(ray_cluster, demo_model_dir):
    tel = Telemetry()
    engine = TrunkEngine(_config(str(demo_model_dir)))
    tel.watch_engine(engine)  # as the gRPC server does: through TrunkEngine.observe
    await engine.start()
    try:
        await _run(engine, "a")
        stats = engine.stats()
        # The steps' records come with the poll that carries their outputs: all are in by now.
        assert _count(tel, "step_seconds") == stats["steps"] > 0
        assert _count(tel, "queue_wait_seconds") == len(PROMPTS)
        assert tel.snapshot()["kv_blocks_total"] == stats["kv_blocks_total"] > 0
        assert engine.telemetry_dropped == 0
    finally:
        await engine.shutdown(0)
        tel.shutdown()


async def test_expert_load_of_ray_expert_groups_reaches_the_edge(ray_cluster, demo_model_dir):
    from moeserve.chaos.cluster import ClusterSpec, EmbeddedCluster

    cluster = EmbeddedCluster(ClusterSpec(expert_groups=1, trunk_worker=True, max_num_seqs=8, num_kv_blocks=64),
                              str(demo_model_dir))
    tel = Telemetry()
    try:
        await cluster.start()
        cluster.engine.observe(tel)
        deadline = time.monotonic() + 60
        for round_ in range(1000):  # the dispatcher hands its load over at most once a second
            await _run(cluster.engine, f"e{round_}-")
            load = tel.snapshot().get("expert_tokens")
            if load or time.monotonic() > deadline:
                break
        assert load and all(n > 0 for n in load.values()), load
        assert all(key.startswith("expert=") and ",layer=" in key for key in load)
        assert _count(tel, "step_seconds") > 0
    finally:
        await cluster.stop()
        tel.shutdown()


async def test_counters_never_go_back_when_the_worker_dies(ray_cluster, demo_model_dir):
    import ray

    tel = Telemetry()
    engine = TrunkEngine(_config(str(demo_model_dir)))
    engine.observe(tel)
    await engine.start()
    seen: list[dict] = []
    sampling = True

    async def sample():
        while sampling:
            seen.append(engine.stats())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        await _run(engine, "before")  # a first worker with counters well above zero
        streams = [engine.generate(f"r{i}", p, SamplingParams(max_tokens=40, ignore_eos=True))
                   for i, p in enumerate(PROMPTS)]
        firsts = [await s.__anext__() for s in streams]  # every request has a token: the worker is mid-run
        assert all(f.new_token_ids and not f.finished for f in firsts)
        steps_at_kill = _count(tel, "step_seconds")
        ray.kill(engine.worker)
        await asyncio.wait_for(engine.wait_restarts(1), 120)
        seen.append(engine.stats())  # right after the restart: the new worker has counted (next to) nothing

        async def rest(stream) -> int:
            n = 0
            async for out in stream:
                n += len(out.new_token_ids)
            return n

        got = await asyncio.wait_for(asyncio.gather(*(rest(s) for s in streams)), 120)
        assert [g + 1 for g in got] == [40] * len(PROMPTS)
        assert engine.restarts == 1 and engine.resubmitted > 0
    finally:
        sampling = False
        await sampler
        final = engine.stats()
        await engine.shutdown(0)
        tel.shutdown()
    seen.append(final)
    for key in WORKER_COUNTERS:
        values = [s[key] for s in seen]
        assert all(a <= b for a, b in zip(values, values[1:])), (key, values)
    assert final["requests_finished"] >= 2 * len(PROMPTS)
    assert final["trunk_restarts"] == 1 and final["requests_in_flight"] == 0
    assert _count(tel, "step_seconds") > steps_at_kill  # the new worker's steps are reported too
