"""`moeserve serve --trunk-workers 1 --expert-groups 1 --autoscaling-policy FILE` scales the trunk workers on
live traffic: requests queue for batch slots, the policy adds a trunk worker, the new worker serves; the
traffic stops, the policy drains it. A real server (in this process, on a private Ray), real gRPC traffic,
the expert group shared by every trunk worker, no request failing and every output the single-process one."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import ray

# Batch slots are the only pressure: the expert group is held at one replica and has no extra copies.
POLICY = """\
policy: target_utilisation
interval_s: 0.5
window_s: 5
params: {sequence_slots: 0.75, trunk_busy: 1.0, expert_busy: 1.0}
limits:
  trunk: {min_replicas: 1, max_replicas: 2}
  expert_groups: {min_replicas: 1, max_replicas: 1}
  downscale_delay_s: 2
redundant_experts: {enabled: false}
"""
MAX_NUM_SEQS = 2
PROMPTS = [[5, 6, 7, 8], [100, 3], [42] * 9, [7, 300, 11, 12, 13]]  # twice the batch slots at a time
MAX_TOKENS = 12
DEADLINE_S = 60.0


def _status(capsys, *argv: str) -> str:
    from moeserve.cluster.cli import main as cli

    assert cli(["status", *argv]) == 0
    return capsys.readouterr().out


async def _wait(predicate, what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout_s:.0f}s"
        await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_serve_adds_a_trunk_worker_under_load_and_drains_it_when_calm(embedded_serve, demo_model_dir,
                                                                           tmp_path, caplog, capsys):
    from moeserve.router.client import AsyncClient
    from moeserve.router.config import EngineConfig
    from moeserve.router.llm_engine import LLMEngine
    from moeserve.router.sequence import SamplingParams
    from moeserve.router.trunk_pool import TrunkPool

    want = [o.new_token_ids for o in LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64))
            .generate_batch(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    caplog.set_level(logging.INFO, logger="moeserve.autoscaler")
    server, _, plane = await embedded_serve("--trunk-workers", "1", "--expert-groups", "1", "--transport", "ray",
                                            "--autoscaling-policy", str(policy), "--num-kv-blocks", "64",
                                            "--max-num-seqs", str(MAX_NUM_SEQS))
    pool, runner = server.engine, plane.autoscaler
    assert isinstance(pool, TrunkPool) and pool.replicas == 1
    assert runner.trunk is not None and runner.scale_trunk is not None
    outs = []
    async with AsyncClient(server.address) as client:
        async def wave() -> None:
            outs.extend(await asyncio.gather(*(client.generate(token_ids=p, max_tokens=MAX_TOKENS, ignore_eos=True)
                                               for p in PROMPTS)))

        deadline = time.monotonic() + DEADLINE_S
        while pool.replicas < 2 and time.monotonic() < deadline:
            await wave()
        assert pool.replicas == 2, [f"{e.kind} {e.unit}: {e.message}" for e in runner.events]
        status = await asyncio.to_thread(_status, capsys, "--address", plane.admin.address)
        assert "trunk workers 2 (0 starting, 0 draining)" in status, status
        served_before = pool.stats()["requests_finished"]
        newest = max(pool.members(), key=lambda m: m.index)
        for _ in range(2):  # the new worker serves
            await wave()
        assert newest.engine.stats()["requests_finished"] > 0, "the added trunk worker served nothing"
        assert pool.stats()["requests_finished"] == served_before + 2 * len(PROMPTS)
    # Calm: after the downscale delay the policy drains one; it finishes (holding nothing) and stops.
    await _wait(lambda: pool.replicas == 1 and not pool.members("draining"), "the trunk back at one worker")
    # The drained worker's dispatcher has left the controller: no expert drain waits for its acknowledgement.
    status = await asyncio.to_thread(ray.get, plane.controller.status.remote(), timeout=30)
    assert status["dispatchers"] == 1, status["dispatchers"]
    runner.stop()
    events = [f"{e.kind} {e.unit}: {e.message}" for e in runner.events]
    trunk = [e for e in runner.events if e.unit == "trunk"]
    assert [e.kind for e in trunk] == ["decision", "done", "decision", "done"], events
    assert trunk[0].message.startswith("trunk 1 -> 2: ") and "slots" in trunk[0].message, events
    assert trunk[1].message.startswith("trunk workers: starting 1 (to 2)"), events
    assert trunk[2].message.startswith("trunk 2 -> 1: "), events
    assert trunk[3].message.startswith("trunk workers: draining 1 (to 1)"), events
    assert any(trunk[0].message in r.getMessage() for r in caplog.records if r.name == "moeserve.autoscaler")
    assert not [e for e in runner.events if e.kind == "failed"], events
    # No request failed, and each answer is the single-process one.
    assert outs and all(o.token_ids == want[i % len(PROMPTS)] for i, o in enumerate(outs))
    stats = pool.stats()
    assert stats["requests_finished"] == len(outs) and stats["requests_in_flight"] == 0, stats


@pytest.mark.asyncio
async def test_moeserve_scale_sets_the_trunk_workers(embedded_serve, capsys):
    """`moeserve scale --trunk-workers N` through the admin API: a worker added, serving, then drained. The
    workers reach the expert group over gloo channels (`--transport gloo`), each over its own."""
    from moeserve.cluster.cli import main as cli
    from moeserve.router.client import AsyncClient

    server, _, plane = await embedded_serve("--trunk-workers", "1", "--expert-groups", "1", "--transport", "gloo",
                                            "--num-kv-blocks", "64")
    pool, address = server.engine, plane.admin.address

    capsys.readouterr()  # what serve printed at start

    def scale(n: int) -> tuple[int, str]:
        code = cli(["scale", "--address", address, "--trunk-workers", str(n)])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    code, out = await asyncio.to_thread(scale, 2)
    assert code == 0 and out.startswith("trunk workers: starting 1 (to 2)"), out
    await _wait(lambda: pool.replicas == 2, "two trunk workers")
    async with AsyncClient(server.address) as client:
        outs = await asyncio.gather(*(client.generate(token_ids=p, max_tokens=MAX_TOKENS, ignore_eos=True)
                                      for p in PROMPTS))
    assert all(len(o.token_ids) == MAX_TOKENS for o in outs)
    assert all(m.engine.stats()["requests_finished"] > 0 for m in pool.members()), "a worker served nothing"
    group = ray.get_actor("moeserve-g0r0-0", namespace="moeserve")
    assert (await group.health.remote())["channels"] == 2
    code = await asyncio.to_thread(cli, ["status", "--address", address])
    out = capsys.readouterr().out
    assert code == 0 and "restarts 0  channels 2" in out, out  # the operator sees both workers' channels
    code, out = await asyncio.to_thread(scale, 1)
    assert code == 0 and out.startswith("trunk workers: draining 1 (to 1)"), out
    await _wait(lambda: pool.replicas == 1 and not pool.members("draining"), "one trunk worker")
    deadline = time.monotonic() + DEADLINE_S
    while (await group.health.remote())["channels"] != 1:  # the drained worker's channel closes with it
        assert time.monotonic() < deadline, "the drained trunk worker's channel is still open"
        await asyncio.sleep(0.1)
    code, out = await asyncio.to_thread(scale, 100)
    assert code == 1 and "INVALID_ARGUMENT" in out and "trunk workers: must be in [1, 64], got 100" in out, out
