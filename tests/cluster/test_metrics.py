"""Every serving metric exists on the real Prometheus endpoint and moves when traffic flows through a real server.

A real engine (the demo model on CPU) behind the real gRPC edge with Telemetry on; traffic goes over
loopback and the metrics are scraped over HTTP, as Prometheus would. Spans land in an in-memory
exporter: one per request, with queue / prefill / decode children, joined to the caller's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from moeserve.cluster.telemetry import Telemetry, TelemetryConfig
from moeserve.router.client import AsyncClient, build_request
from moeserve.router.config import EngineConfig
from moeserve.router.engine import AsyncEngine
from moeserve.router.server import InferenceServer, ServerConfig

TOKEN = "metrics-test-token-0123456789"
KV_BLOCKS = 64
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def scrape(port: int) -> dict[str, float]:
    """Samples of the /metrics page: 'name{label="v",...}' -> value."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k not in ("le",))
            if "le" in sample.labels:
                continue  # buckets: the _count and _sum samples say enough here
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


@contextlib.asynccontextmanager
async def observed_server(demo_model_dir, config: TelemetryConfig = TelemetryConfig(prometheus_port=0)):
    spans = InMemorySpanExporter()
    tel = Telemetry(config, span_exporter=spans)
    cfg = EngineConfig(model=str(demo_model_dir), max_num_seqs=1, max_num_batched_tokens=64,
                       num_kv_blocks=KV_BLOCKS, block_size=16)
    srv = InferenceServer(AsyncEngine.from_config(cfg), ServerConfig(port=0, auth_tokens=(TOKEN,), http_port=0),
                          telemetry=tel)
    await srv.start()
    try:
        yield srv, tel, spans
    finally:
        await srv.stop(0)
        tel.shutdown()


async def wait_active(srv: InferenceServer, n: int) -> None:
    await asyncio.wait_for(srv.servicer.wait_for(lambda: srv.servicer.num_active == n), 60)


@pytest.mark.asyncio
async def test_every_metric_moves_with_real_traffic(demo_model_dir):
    async with observed_server(demo_model_dir) as (srv, tel, spans):
        port = tel.prometheus_port
        before = scrape(port)
        assert before["moeserve_kv_blocks_total"] == KV_BLOCKS
        for idle in ("moeserve_queue_depth", "moeserve_running_sequences", "moeserve_kv_blocks_used"):
            assert before[idle] == 0, idle

        async with AsyncClient(srv.address, token=TOKEN) as client:
            # live gauges: one request running (holding KV blocks), one waiting behind it
            limit = srv.servicer.limits.context_length - 8
            running = client.generate_stream(token_ids=[5, 6, 7, 8], max_tokens=limit, ignore_eos=True)
            assert (await running.read()).token_ids
            waiting = client.generate_stream(token_ids=[9, 9], max_tokens=2, ignore_eos=True)
            await wait_active(srv, 2)
            busy = scrape(port)
            assert busy["moeserve_running_sequences"] == 1 and busy["moeserve_queue_depth"] == 1
            assert busy["moeserve_kv_blocks_used"] > 0
            assert busy["moeserve_output_tokens_total"] >= 1  # counted while the stream is still going
            running.cancel()
            assert [m async for m in waiting][-1].usage.completion_tokens == 2
            await wait_active(srv, 0)

            # finished requests, one of them joined to the caller's trace
            await client.generate(prompt="hello there", max_tokens=6, ignore_eos=True)
            request = build_request(token_ids=[1, 2, 3], max_tokens=5, ignore_eos=True)
            traced = await client.send(request, metadata=(("traceparent", TRACEPARENT),))
            assert len(traced.token_ids) == 5
            # the same 40-token prompt twice: the second reads its first two blocks (32 tokens) from the prefix cache
            usage = [(await client.generate(token_ids=list(range(1, 41)), max_tokens=1)).usage for _ in range(2)]
            assert [(u.prompt_tokens, u.cached_prompt_tokens) for u in usage] == [(40, 0), (40, 32)]
            # errors by code: a bad request, and a caller without credentials
            with pytest.raises(grpc.aio.AioRpcError):
                await client.generate(prompt="hi", temperature=-1.0)
        async with AsyncClient(srv.address) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError):
                await anonymous.generate(prompt="hi", max_tokens=2)

        after = scrape(port)
        moved = {
            "moeserve_ttft_seconds_count": 3, "moeserve_tpot_seconds_count": 3, "moeserve_e2e_latency_seconds_count": 3,
            "moeserve_queue_wait_seconds_count": 4, "moeserve_step_seconds_count": 10,
            "moeserve_input_tokens_total": 4 + 2 + 1 + 3, "moeserve_output_tokens_total": 2 + 6 + 5 + 1,
            'moeserve_requests_total{finish_reason="length"}': 3,
            'moeserve_errors_total{code="INVALID_ARGUMENT"}': 1, 'moeserve_errors_total{code="UNAUTHENTICATED"}': 1,
            'moeserve_errors_total{code="CANCELLED"}': 1,
            "moeserve_prefix_cache_queried_tokens_total": 4 + 2 + 1 + 3 + 80, "moeserve_prefix_cache_hit_tokens_total": 32,
            "moeserve_kv_blocks_cached": 2,  # the 40-token prompt's two whole blocks, free but kept
        }
        for name, at_least in moved.items():
            assert after.get(name, 0) - before.get(name, 0) >= at_least, (name, after.get(name), before.get(name))
        assert after["moeserve_ttft_seconds_sum"] > 0 and after["moeserve_e2e_latency_seconds_sum"] > 0
        for idle in ("moeserve_queue_depth", "moeserve_running_sequences", "moeserve_kv_blocks_used"):
            assert after[idle] == 0, idle  # back to rest once the traffic is over
        assert tel.snapshot()["kv_blocks_total"] == KV_BLOCKS  # what `moeserve status` reads

        finished = spans.get_finished_spans()
        roots = [s for s in finished if s.name.startswith("moeserve.v1.Inference/")]
        joined = [s for s in roots if format(s.context.trace_id, "032x") == TRACE_ID]
        assert len(joined) == 1 and joined[0].attributes["moeserve.finish_reason"] == "length"
        children = {s.name: s for s in finished if s.parent is not None and s.parent.span_id == joined[0].context.span_id}
        assert set(children) == {"queue", "prefill", "decode"}
        assert children["queue"].end_time <= children["prefill"].start_time + 1000  # in order (ns; clock mapping)
        assert children["decode"].attributes["moeserve.decode_tokens"] == 4
        codes = {s.attributes.get("rpc.grpc.status_code") for s in roots}
        assert {"OK", "INVALID_ARGUMENT", "CANCELLED"} <= codes



@pytest.mark.asyncio
async def test_ttft_is_counted_at_the_first_token_once_per_request(demo_model_dir):
    """A long stream's TTFT is in the histogram while it still decodes; a request counts once if it got a
    first token, whatever ended it, and not at all if it ended before one."""
    async with observed_server(demo_model_dir) as (srv, tel, _):
        port = tel.prometheus_port
        async with AsyncClient(srv.address, token=TOKEN) as client:
            limit = srv.servicer.limits.context_length - 8
            long = client.generate_stream(token_ids=[5, 6, 7, 8], max_tokens=limit, ignore_eos=True)
            first = await long.read()
            assert first.token_ids and not first.finish_reason
            mid = scrape(port)
            # Nothing has finished (no e2e, no TPOT), yet the running stream's first token is counted.
            assert "moeserve_e2e_latency_seconds_count" not in mid and "moeserve_tpot_seconds_count" not in mid
            assert mid.get("moeserve_ttft_seconds_count") == 1
            assert mid["moeserve_ttft_seconds_sum"] == pytest.approx(first.time_to_first_token, rel=1e-9)

            # Behind it in the one batch slot: one request passes its deadline, one is cancelled, neither
            # with a first token.
            late = client.generate_stream(token_ids=[9, 9], max_tokens=2, ignore_eos=True, timeout=0.5)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await late.read()
            assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            dropped = client.generate_stream(token_ids=[9, 9], max_tokens=2, ignore_eos=True)
            await wait_active(srv, 2)
            dropped.cancel()
            await wait_active(srv, 1)
            long.cancel()  # ended after its first token
            await wait_active(srv, 0)

            # A stream that fails after its first token (its deadline passes mid-decode), and one unary call.
            expiring = client.generate_stream(token_ids=[1, 2, 3], max_tokens=limit, ignore_eos=True, timeout=0.5)
            expiring_first = await expiring.read()
            assert expiring_first.token_ids
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                while await expiring.read() is not grpc.aio.EOF:
                    pass
            assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_active(srv, 0)
            unary = await client.generate(token_ids=[4, 5], max_tokens=3, ignore_eos=True)

        after = scrape(port)
        assert after["moeserve_ttft_seconds_count"] == 3  # long, expiring, unary: once each
        sent = first.time_to_first_token + expiring_first.time_to_first_token + unary.time_to_first_token
        assert after["moeserve_ttft_seconds_sum"] == pytest.approx(sent, rel=1e-9)
        assert after["moeserve_e2e_latency_seconds_count"] == after["moeserve_tpot_seconds_count"] == 1



class Collector:
    """A real OTLP/gRPC receiver on loopback that keeps what it is sent (traces and metrics)."""

    def __init__(self):
        from concurrent import futures

        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc

        self.span_names: list[str] = []
        self.metric_names: set[str] = set()
        collector = self

        class Traces(tgrpc.TraceServiceServicer):
            def Export(self, request, context):
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        collector.span_names += [span.name for span in ss.spans]
                return tpb.ExportTraceServiceResponse()

        class Metrics(mgrpc.MetricsServiceServicer):
            def Export(self, request, context):
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        collector.metric_names.update(m.name for m in sm.metrics)
                return mpb.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        tgrpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        mgrpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


@pytest.mark.asyncio
async def test_otlp_export_reaches_a_collector(demo_model_dir):
    collector = Collector()
    try:
        config = TelemetryConfig(otlp_endpoint=f"http://127.0.0.1:{collector.port}", export_interval_s=600)
        async with observed_server(demo_model_dir, config) as (srv, tel, _):
            async with AsyncClient(srv.address, token=TOKEN) as client:
                assert len((await client.generate(prompt="hi", max_tokens=3, ignore_eos=True)).token_ids) == 3
        # leaving observed_server shut the Telemetry down, which flushes both exporters
        assert "moeserve.v1.Inference/Generate" in collector.span_names
        assert {"queue", "prefill", "decode"} <= set(collector.span_names)
        assert {"ttft_seconds", "output_tokens", "kv_blocks_total", "step_seconds"} <= collector.metric_names
    finally:
        collector.server.stop(None)


@pytest.mark.asyncio
async def test_expert_load_is_counted_when_experts_are_dispatched_to_groups(demo_model_dir):
    from moeserve.experts.backend import local_expert_backend

    tel = Telemetry(TelemetryConfig(prometheus_port=0))
    cfg = EngineConfig(model=str(demo_model_dir), max_num_seqs=2, max_num_batched_tokens=64, num_kv_blocks=KV_BLOCKS,
                       expert_backend=local_expert_backend(str(demo_model_dir), num_groups=2), load_experts=False)
    srv = InferenceServer(AsyncEngine.from_config(cfg), ServerConfig(port=0), telemetry=tel)
    await srv.start()
    try:
        async with AsyncClient(srv.address) as client:
            await client.generate(token_ids=[5, 6, 7, 8], max_tokens=3, ignore_eos=True)
        dispatcher = srv.engine.core.model.experts_backend
        assert dispatcher.telemetry is tel  # attached by the server
        dispatcher.load.flush(tel, force=True)  # the dispatcher batches its counts for a second
        load = {k: v for k, v in scrape(tel.prometheus_port).items() if k.startswith("moeserve_expert_tokens_total{")}
        mc = srv.engine.model_config
        # every token of the prompt and of the completion's first two steps went to top-k experts per MoE layer
        assert sum(load.values()) == (4 + 2) * mc.moe.num_experts_per_tok * len(mc.moe.moe_layer_ids), load
    finally:
        await srv.stop(0)
        tel.shutdown()


@pytest.mark.asyncio
async def test_group_utilisation_moves_with_traffic_to_ray_expert_groups(embedded_serve):
    """serve --expert-groups 2 --transport ray: each group's busy share, which the groups report to the
    controller, reaches the edge's /metrics while traffic flows."""
    import time

    server, tel, _ = await embedded_serve("--expert-groups", "2", "--transport", "ray", "--prometheus-port", "0",
                                          "--num-kv-blocks", "64")
    names = [f'moeserve_expert_group_utilisation{{group="g{g}"}}' for g in (0, 1)]
    shares: dict[str, float | None] = {}
    deadline = time.monotonic() + 30  # serve asks the controller every 2 s
    async with AsyncClient(server.address) as client:
        while time.monotonic() < deadline and not all(shares.get(n) for n in names):
            outs = await asyncio.gather(*(client.generate(token_ids=[5, 6, 7, i], max_tokens=4, ignore_eos=True)
                                          for i in range(4)))
            assert all(len(o.token_ids) == 4 for o in outs)
            samples = await asyncio.to_thread(scrape, tel.prometheus_port)
            shares = {n: samples.get(n) for n in names}
    assert all(shares.get(n) is not None and 0 < shares[n] <= 1 for n in names), shares


@pytest.mark.asyncio
async def test_http_requests_are_counted_and_traced_as_grpc_ones_are(demo_model_dir):
    import aiohttp

    async with observed_server(demo_model_dir) as (srv, tel, spans):
        before = scrape(tel.prometheus_port)
        url = f"http://127.0.0.1:{srv.http.port}/v1/completions"
        auth = {"Authorization": f"Bearer {TOKEN}", "traceparent": TRACEPARENT}
        async with aiohttp.ClientSession() as http:
            for stream in (False, True):
                async with http.post(url, json={"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True,
                                                 "stream": stream}, headers=auth) as r:
                    assert r.status == 200
                    await r.read()
            async with http.post(url, json={"prompt": [1, 2, 3], "temperature": -1}, headers=auth) as r:
                assert r.status == 400
            async with http.post(url, json={"prompt": [1, 2, 3], "suffix": "!"}, headers=auth) as r:
                assert r.status == 400  # refused before it became a request: counted all the same
            async with http.post(url, json={"prompt": [1, 2, 3]}) as r:
                assert r.status == 401
        after = scrape(tel.prometheus_port)
        moved = {'moeserve_requests_total{finish_reason="length"}': 2, "moeserve_ttft_seconds_count": 2,
                 "moeserve_output_tokens_total": 8, 'moeserve_errors_total{code="INVALID_ARGUMENT"}': 2,
                 'moeserve_errors_total{code="UNAUTHENTICATED"}': 1}
        for name, at_least in moved.items():
            assert after.get(name, 0) - before.get(name, 0) >= at_least, (name, after.get(name), before.get(name))
        roots = [s for s in spans.get_finished_spans() if s.name == "POST /v1/completions"]
        assert len(roots) == 3 and all(format(s.context.trace_id, "032x") == TRACE_ID for s in roots)
