"""Telemetry: instruments exist, move when recorded, and reach Prometheus and the span exporter."""

import urllib.request

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moeserve.cluster.telemetry import Telemetry, TelemetryConfig


def test_metrics_move_and_are_scraped_by_prometheus():
    spans = InMemorySpanExporter()
    tel = Telemetry(TelemetryConfig(prometheus_port=0), span_exporter=spans)
    try:
        state = {"queue_depth": 3, "kv_blocks_used": 7}
        tel.add_gauge_source(lambda: state)
        tel.ttft.record(0.2)
        tel.output_tokens.add(5)
        tel.expert_tokens.add(4, {"layer": 1, "expert": 3})
        tel.set_group_utilisation("g0", 0.5)
        with tel.span("request", request_id="r1"):
            pass
        snap = tel.snapshot()
        assert snap["ttft_seconds"] == {"count": 1, "sum": 0.2}
        assert snap["output_tokens"] == 5
        assert snap["queue_depth"] == 3
        assert snap["expert_tokens"] == {"expert=3,layer=1": 4}
        state["queue_depth"] = 0
        assert tel.snapshot()["queue_depth"] == 0

        body = urllib.request.urlopen(f"http://127.0.0.1:{tel.prometheus_port}/metrics", timeout=10).read().decode()
        assert "moeserve_ttft_seconds_bucket" in body
        assert "moeserve_output_tokens_total 5.0" in body
        assert 'moeserve_expert_group_utilisation{group="g0"} 0.5' in body
        assert [s.name for s in spans.get_finished_spans()] == ["request"]
    finally:
        tel.shutdown()


def test_ttft_is_recorded_with_the_first_token_once_per_request():
    from moeserve.router.sequence import RequestOutput

    def out(ids, ttft, reason=None):
        return RequestOutput("r", ids, "", reason is not None, reason, 3, len(ids), ttft)

    def ttft_count(tel):
        return tel.snapshot().get("ttft_seconds", {"count": 0})["count"]

    tel = Telemetry()
    try:
        never = tel.track_request("GenerateStream")  # its deadline passes in the queue
        never.output(out([], None, "cancelled"))
        never.end("DEADLINE_EXCEEDED")
        assert ttft_count(tel) == 0

        broken = tel.track_request("GenerateStream")  # fails after two tokens
        broken.output(out([7], 0.25))
        assert tel.snapshot()["ttft_seconds"] == {"count": 1, "sum": 0.25}  # before the request ends
        broken.output(out([8], 0.25))
        broken.end("UNAVAILABLE")
        assert ttft_count(tel) == 1

        one = tel.track_request("Generate")  # first token and end in one output
        one.output(out([9], 0.5, "length"))
        one.end()
        assert tel.snapshot()["ttft_seconds"] == {"count": 2, "sum": 0.75}
        assert tel.snapshot()["e2e_latency_seconds"]["count"] == 2  # `never` finished too, `broken` did not
    finally:
        tel.shutdown()


def test_config_rejects_bad_values():
    import pytest

    with pytest.raises(ValueError, match="prometheus_port"):
        TelemetryConfig(prometheus_port=70000)
    with pytest.raises(ValueError, match="trace_sample_ratio"):
        TelemetryConfig(trace_sample_ratio=2)
