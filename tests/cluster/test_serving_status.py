"""The edge's live serving figures in `moeserve status`: the window arithmetic alone, then over a real
`moeserve serve --expert-groups 2 --transport ray` (in this process, on a private Ray) with traffic."""

from __future__ import annotations

import asyncio
import json

import pytest

from moeserve.cluster.serving_status import ServingFigures, bucket_quantile, latency_summary
from moeserve.cluster.telemetry import Telemetry


def test_bucket_quantile_interpolates_within_the_bucket():
    bounds = (0.1, 0.2, 0.5)
    assert bucket_quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(0.15)
    assert bucket_quantile(0.5, bounds, [10, 0, 0, 0]) == pytest.approx(0.05)  # the first bucket starts at 0
    assert bucket_quantile(0.99, bounds, [50, 0, 0, 50]) == 0.5  # in +Inf: the largest finite bound
    assert bucket_quantile(0.9, bounds, [0, 0, 0, 0]) == 0.0
    summary = latency_summary(bounds, [0, 4, 0, 0], 0.6)
    assert summary["count"] == 4 and summary["mean_s"] == pytest.approx(0.15)
    assert summary["p50_s"] <= summary["p90_s"] <= summary["p99_s"] <= 0.2


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rates_and_latencies_cover_the_window_not_the_lifetime():
    stats = dict(running=2, waiting=1, kv_blocks_used=10, kv_blocks_total=40, prompt_tokens=0, tokens_generated=0,
                 requests_finished=0, prefix_cache_queried_tokens=0, prefix_cache_hit_tokens=0)
    clock, tel = _Clock(), Telemetry()
    try:
        figures = ServingFigures(type("E", (), {"stats": lambda self: dict(stats)})(), tel, window_s=60, clock=clock)
        for _ in range(3):  # a slow start: 1 token/s and 1 s TTFTs for 60 s
            clock.t += 20
            stats["tokens_generated"] += 20
            tel.ttft.record(1.0)
            first = figures()
        assert first["window_s"] == 60 and first["output_tokens_per_s"] == pytest.approx(1.0)
        assert first["ttft"]["count"] == 3 and 0.5 < first["ttft"]["p50_s"] <= 1.0
        for _ in range(3):  # then fast: 10 tokens/s, 20 ms TTFTs; the window forgets the slow start
            clock.t += 30
            stats["tokens_generated"] += 300
            stats["requests_finished"] += 3
            stats["prefix_cache_queried_tokens"] += 100
            stats["prefix_cache_hit_tokens"] += 75
            stats["draft_tokens"] = stats.get("draft_tokens", 0) + 60
            stats["draft_tokens_accepted"] = stats.get("draft_tokens_accepted", 0) + 15
            tel.ttft.record(0.02)
            now = figures()
        assert now["window_s"] == 60 and now["output_tokens_per_s"] == pytest.approx(10.0)
        assert now["requests_per_s"] == pytest.approx(0.1) and now["prefix_cache_hit_rate"] == pytest.approx(0.75)
        assert first["prefix_cache_hit_rate"] == 0.0  # nothing admitted over its window
        assert now["draft_tokens_per_s"] == pytest.approx(2.0) and now["draft_acceptance_rate"] == pytest.approx(0.25)
        assert first["draft_tokens_per_s"] == 0.0 and first["draft_acceptance_rate"] == 0.0
        assert now["ttft"]["count"] == 2 and now["ttft"]["p99_s"] <= 0.025
        assert (now["running"], now["waiting"], now["kv_blocks_used"], now["kv_blocks_total"]) == (2, 1, 10, 40)
        assert now["tpot"]["count"] == 0
    finally:
        tel.shutdown()
    bare = ServingFigures(type("E", (), {"stats": lambda self: dict(stats)})(), None)()
    assert "ttft" not in bare and bare["running"] == 2


def _status(capsys, *argv: str) -> str:
    from moeserve.cluster.cli import main as cli

    assert cli(["status", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.asyncio
async def test_status_shows_the_live_serving_figures(embedded_serve, capsys):
    from moeserve.router.client import AsyncClient

    server, _, plane = await embedded_serve("--expert-groups", "2", "--transport", "ray", "--prometheus-port", "0",
                                              "--num-kv-blocks", "64")
    address = plane.admin.address
    idle = await asyncio.to_thread(_status, capsys, "--address", address)
    assert "serving  running 0  waiting 0  kv blocks 0/64" in idle, idle
    async with AsyncClient(server.address) as client:
        outs = await asyncio.gather(*(client.generate(token_ids=[5, 6, 7, i], max_tokens=6, ignore_eos=True)
                                      for i in range(4)))
    assert all(len(o.token_ids) == 6 for o in outs)
    text = await asyncio.to_thread(_status, capsys, "--address", address)
    raw = await asyncio.to_thread(_status, capsys, "--address", address, "--json")
    assert "group 0  experts" in text  # the cluster's own status is still there
    assert "ttft  p50 " in text and "(4 requests)" in text and "tpot  p50 " in text, text
    serving = json.loads(raw)["serving"]
    assert serving["running"] == 0 and serving["waiting"] == 0 and serving["kvBlocksTotal"] == 64
    assert serving["outputTokensPerS"] > 0 and serving["inputTokensPerS"] > 0 and serving["requestsPerS"] > 0
    assert int(serving["ttft"]["count"]) == 4 and serving["ttft"]["p50S"] > 0
    assert int(serving["tpot"]["count"]) == 4 and 0 < serving["tpot"]["p50S"] <= serving["tpot"]["p99S"]


def test_status_lines_name_the_drafts_only_where_there_are_some():
    from moeserve.cluster.admin_server import serving_status
    from moeserve.cluster.cli.status import format_serving

    figures = dict(running=1, waiting=0, kv_blocks_used=4, kv_blocks_total=40, window_s=10.0, input_tokens_per_s=5.0,
                   output_tokens_per_s=50.0, requests_per_s=0.5, prefix_cache_hit_rate=0.0)
    assert "drafts" not in "\n".join(format_serving(serving_status(figures)))
    lines = format_serving(serving_status(dict(figures, draft_tokens_per_s=40.0, draft_acceptance_rate=0.625)))
    assert "drafts 40.0 tokens/s, 62% kept" in lines[1] or "drafts 40.0 tokens/s, 63% kept" in lines[1]
