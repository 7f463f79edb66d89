"""`moeserve serve --expert-groups 1 --transport ray --autoscaling-policy FILE` scales an expert group on
the trunk's signals: a real server (in this process, on a private Ray), real gRPC traffic, and an SLO
policy whose only reason to grow the group is the edge's TTFT (the busy-share headroom never asks).
The SLO policy gives latency pressure to the unit on the critical path, the busiest; the group is made
that unit as a slow group would be, with the chaos suite's injected delay on its replica (on this
tiny model the trunk's own step work would otherwise outweigh the group's)."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest
import ray

# TTFT above its (tiny) SLO is the only pressure: TPOT has the largest SLO allowed, a busy share can
# never exceed expert_busy_ceiling 1.0, and the groups' extra copies are off.
POLICY = """\
policy: slo
interval_s: 0.5
window_s: 30
slo: {ttft_s: 0.001, tpot_s: 60, quantile: p50}
params: {expert_busy_ceiling: 1.0}
limits:
  trunk: {min_replicas: 1, max_replicas: 2}
  expert_groups: {min_replicas: 1, max_replicas: 2}
redundant_experts: {enabled: false}
"""
MAX_NUM_SEQS = 2
DEADLINE_S = 40.0
GROUP_DELAY_S = 0.02


def _serving_replicas(controller) -> int:
    status = ray.get(controller.status.remote(), timeout=30)
    return sum(r["serving"] for g in status["groups"] for r in g["replicas"])


@pytest.mark.asyncio
async def test_serve_scales_a_group_up_on_the_edge_ttft(embedded_serve, tmp_path, caplog):
    from moeserve.router.client import AsyncClient

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    caplog.set_level(logging.INFO, logger="moeserve.autoscaler")
    server, _, plane = await embedded_serve("--expert-groups", "1", "--transport", "ray", "--autoscaling-policy",
                                              str(policy), "--prometheus-port", "0", "--num-kv-blocks", "64",
                                              "--max-num-seqs", str(MAX_NUM_SEQS))
    runner, controller = plane.autoscaler, plane.controller
    outs = []
    try:
        assert runner.trunk is not None, "serve attached no trunk report to the autoscaler"
        assert _serving_replicas(controller) == 1
        serving = await controller.snapshot.remote()
        for handle in serving.handles.values():  # every batch the group runs takes GROUP_DELAY_S more
            await handle.inject_delay.remote(GROUP_DELAY_S)

        def scaled() -> bool:
            return any(e.kind == "done" and e.unit == "g0" for e in runner.events)

        # Twice the batch slots of requests at a time, until the group has grown (or the deadline).
        deadline = time.monotonic() + DEADLINE_S
        async with AsyncClient(server.address) as client:
            while not scaled() and time.monotonic() < deadline:
                prompts = [[5, 6, 7, (len(outs) + i) % 256] for i in range(2 * MAX_NUM_SEQS)]
                outs += await asyncio.gather(*(client.generate(token_ids=p, max_tokens=6, ignore_eos=True)
                                               for p in prompts))
        replicas = _serving_replicas(controller)
    finally:
        runner.stop()  # its events stay as they are for the checks below
    events = [f"{e.kind} {e.unit}: {e.message}" for e in runner.events]
    decisions = [e.message for e in runner.events if e.kind == "decision" and e.unit == "g0"]
    assert decisions, f"no scaling decision for g0 in {DEADLINE_S:.0f}s of traffic: {events}"
    # The reason names the trunk's TTFT, which only the edge measures.
    first = decisions[0]
    assert first.startswith("g0 1 -> 2: p50 TTFT ") and "on the critical path" in first, first
    ttft = float(re.search(r"TTFT ([0-9.]+)s", first).group(1))
    assert ttft > 0.0005, first  # above setpoint x SLO
    assert any(first in r.getMessage() for r in caplog.records if r.name == "moeserve.autoscaler"), events
    assert scaled() and replicas == 2, events
    assert not [e for e in runner.events if e.kind == "failed"], events
    # The policy also asked for a second trunk worker (two requests per batch slot): said once, not carried out.
    trunk = [e.message for e in runner.events if e.unit == "trunk"]
    assert len(trunk) == 1 and trunk[0].startswith("trunk target 2 not carried out"), events
    # No request failed while the group grew.
    assert outs and all(len(o.token_ids) == 6 for o in outs)
