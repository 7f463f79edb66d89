"""Metrics and traces for a moeserve process: OpenTelemetry instruments, a Prometheus endpoint, OTLP.

One `Telemetry` object per serving process owns its meter and tracer providers (never the global
ones, so several servers and tests can live in one process). The engine, the gRPC edge and the
controller record into it; `snapshot()` reads the current values back for `moeserve status`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SimpleSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

# Latency buckets in seconds: from sub-millisecond decode steps to minute-long requests.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class TelemetryConfig:
    """Where metrics and traces go. Everything is off unless asked for."""

    service_name: str = "moeserve"
    prometheus_port: int | None = None  # serve /metrics on this port (0 = pick a free one)
    prometheus_host: str = "127.0.0.1"
    otlp_endpoint: str | None = None  # e.g. "http://collector:4317" (gRPC OTLP)
    otlp_insecure: bool = True
    export_interval_s: float = 10.0
    trace_sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.prometheus_port is not None and not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port: {self.prometheus_port} is outside 0..65535")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio: {self.trace_sample_ratio} is outside [0, 1]")
        if self.export_interval_s <= 0:
            raise ValueError(f"export_interval_s: must be > 0, got {self.export_interval_s}")


GaugeSource = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class HistogramData:
    """One histogram read back: upper bounds, a count per bucket (one more than bounds: +Inf), the sum."""

    bounds: tuple[float, ...]
    counts: list[int]
    sum: float


class Telemetry:
    """The instruments of one serving process and the exporters behind them."""

    def __init__(self, config: TelemetryConfig | None = None, span_exporter: SpanExporter | None = None):
        self.config = config or TelemetryConfig()
        resource = Resource.create({"service.name": self.config.service_name})
        self._reader = InMemoryMetricReader()  # backs snapshot() and tests
        readers = [self._reader]
        self.registry = CollectorRegistry(auto_describe=True)
        self._prom_reader = PrometheusMetricReader(registry=self.registry, prefix="moeserve", scope_info_enabled=False)
        readers.append(self._prom_reader)
        if self.config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=self.config.otlp_endpoint, insecure=self.config.otlp_insecure),
                    export_interval_millis=int(self.config.export_interval_s * 1000),
                )
            )
        views = [
            View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(_LATENCY_BUCKETS))
            for name in ("ttft_seconds", "tpot_seconds", "e2e_latency_seconds", "queue_wait_seconds", "step_seconds")
        ]
        self.meter_provider = MeterProvider(metric_readers=readers, resource=resource, views=views)
        self.tracer_provider = TracerProvider(resource=resource, sampler=_sampler(self.config.trace_sample_ratio))
        if span_exporter is not None:
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        if self.config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=self.config.otlp_endpoint, insecure=self.config.otlp_insecure))
            )
        self.tracer: Tracer = self.tracer_provider.get_tracer("moeserve")
        meter = self.meter_provider.get_meter("moeserve")

        self.ttft = meter.create_histogram("ttft_seconds", unit="s", description="time to first token")
        self.tpot = meter.create_histogram("tpot_seconds", unit="s", description="time per output token after the first")
        self.e2e_latency = meter.create_histogram("e2e_latency_seconds", unit="s", description="request latency, arrival to last token")
        self.queue_wait = meter.create_histogram("queue_wait_seconds", unit="s", description="time from arrival to first schedule")
        self.step_time = meter.create_histogram("step_seconds", unit="s", description="engine step duration")
        self.requests = meter.create_counter("requests", description="finished requests by finish reason")
        self.errors = meter.create_counter("errors", description="failed RPCs by gRPC status code")
        self.input_tokens = meter.create_counter("input_tokens", description="prompt tokens admitted")
        self.output_tokens = meter.create_counter("output_tokens", description="tokens generated")
        self.expert_tokens = meter.create_counter("expert_tokens", description="token rows routed, by layer and expert")
        self.scaling_events = meter.create_counter("scaling_events", description="changes of the serving set, by action")

        self._lock = threading.Lock()
        self._gauge_sources: list[GaugeSource] = []
        self._group_busy: dict[str, float] = {}
        for name, description in (
            ("queue_depth", "requests waiting to be scheduled"),
            ("running_sequences", "sequences in the running batch"),
            ("kv_blocks_used", "KV cache blocks in use"),
            ("kv_blocks_total", "KV cache blocks in all"),
            ("kv_blocks_cached", "free KV cache blocks still holding a cached prefix (reused until taken)"),
        ):
            meter.create_observable_gauge(name, callbacks=[self._gauge_callback(name)], description=description)
        for name, description in (
            ("prefix_cache_queried_tokens", "tokens of admitted requests looked up in the prefix cache"),
            ("prefix_cache_hit_tokens", "of those, tokens whose KV the prefix cache held"),
            ("draft_tokens", "speculative decoding: drafted tokens verified"),
            ("draft_tokens_accepted", "of those, tokens the model agreed with (kept)"),
        ):
            meter.create_observable_counter(name, callbacks=[self._gauge_callback(name)], description=description)
        meter.create_observable_gauge(
            "expert_group_utilisation", callbacks=[self._group_callback], description="busy share of each expert group"
        )
        self._http_server = None
        self.prometheus_port: int | None = None
        if self.config.prometheus_port is not None:
            self._http_server, _ = start_http_server(
                self.config.prometheus_port, addr=self.config.prometheus_host, registry=self.registry
            )
            self.prometheus_port = self._http_server.server_port
            log.info("Prometheus metrics on http://%s:%d/metrics", self.config.prometheus_host, self.prometheus_port)

    # --- gauges fed from live state -------------------------------------------------------
    def add_gauge_source(self, source: GaugeSource) -> None:
        """Register a callable returning current values, e.g. {"queue_depth": 3, "kv_blocks_used": 10}."""
        with self._lock:
            self._gauge_sources.append(source)

    def set_group_utilisation(self, group: str, busy_share: float) -> None:
        with self._lock:
            self._group_busy[group] = busy_share

    def forget_group_utilisation(self, group: str) -> None:
        """Stop exporting `group`'s busy share (the group no longer exists)."""
        with self._lock:
            self._group_busy.pop(group, None)

    def _gauge_callback(self, name: str):
        def callback(_options: CallbackOptions) -> Iterator[Observation]:
            total, seen = 0.0, False
            with self._lock:
                sources = list(self._gauge_sources)
            for source in sources:
                try:
                    values = source()
                except Exception:  # a dying source must not break the scrape
                    log.exception("gauge source failed")
                    continue
                if name in values:
                    total += float(values[name])
                    seen = True
            if seen:
                yield Observation(total)

        return callback

    def _group_callback(self, _options: CallbackOptions) -> Iterator[Observation]:
        with self._lock:
            items = list(self._group_busy.items())
        for group, share in items:
            yield Observation(share, {"group": group})

    def watch_engine(self, engine) -> None:
        """Gauges from `engine.stats()`; step times and queue waits from the engine, if it reports them.

        Through `observe`, an expert dispatcher serving the engine's model (router.dispatch.ExpertDispatcher)
        records per-expert token load and scaling events here too.
        """
        self.add_gauge_source(lambda: engine_gauges(engine.stats()))
        if hasattr(engine, "observe"):
            engine.observe(self)

    # --- recorded by the engine (step thread) and the edge (event loop) -------------------
    def record_step(self, seconds: float, num_tokens: int) -> None:
        self.step_time.record(seconds)

    def record_queue_wait(self, seconds: float) -> None:
        self.queue_wait.record(seconds)

    def record_error(self, code: str) -> None:
        """One RPC that ended with gRPC status `code` (its name, e.g. "INVALID_ARGUMENT")."""
        self.errors.add(1, {"code": code})

    def track_request(self, method: str, metadata=None, span_name: str | None = None) -> "RequestTracker":
        """A span and metrics for one Generate/GenerateStream call (a W3C traceparent in metadata is its parent);
        the span is moeserve.v1.Inference/<method> unless `span_name` says otherwise (the HTTP front's)."""
        return RequestTracker(self, method, metadata, span_name)

    # --- traces ---------------------------------------------------------------------------
    @contextmanager
    def span(self, name: str, **attributes) -> Iterator[Span]:
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    # --- reading back ---------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """Current metric values by name: sums for counters, {count, sum} for histograms, gauge values."""
        out: dict[str, object] = {}
        for name, points in self._points():
            if hasattr(points[0], "bucket_counts"):
                out[name] = {"count": sum(p.count for p in points), "sum": sum(p.sum for p in points)}
            elif len(points) == 1 and not points[0].attributes:
                out[name] = points[0].value
            else:
                out[name] = {",".join(f"{k}={v}" for k, v in sorted(p.attributes.items())): p.value for p in points}
        return out

    def _points(self) -> Iterator[tuple[str, list]]:
        """(metric name, its data points) of every metric that has points, as the reader has them now."""
        data = self._reader.get_metrics_data()
        if data is None:
            return
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    points = list(metric.data.data_points)
                    if points:
                        yield metric.name, points

    def histograms(self, *names: str) -> dict[str, "HistogramData"]:
        """Bucket counts of the named histograms since start, all attributes together (absent: nothing recorded)."""
        out: dict[str, HistogramData] = {}
        for name, points in self._points():
            if name in names and hasattr(points[0], "bucket_counts"):
                counts = [sum(c) for c in zip(*(p.bucket_counts for p in points))]
                out[name] = HistogramData(tuple(points[0].explicit_bounds), counts, sum(p.sum for p in points))
        return out

    def shutdown(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


class RequestTracker:
    """One inference RPC: its span (children queue, prefill, decode from the engine's timeline) and metrics.

    TTFT is recorded with the request's first token, TPOT and e2e latency when it finishes: live readers
    window these histograms, and a long generation's first token belongs to when it came, not to its end.
    """

    def __init__(self, telemetry: Telemetry, method: str, metadata=None, span_name: str | None = None):
        self._tel = telemetry
        carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
        parent = TraceContextTextMapPropagator().extract(carrier) if "traceparent" in carrier else None
        self.span = telemetry.tracer.start_span(span_name or f"moeserve.v1.Inference/{method}", context=parent,
                                                kind=SpanKind.SERVER)
        self._start = time.monotonic()
        self._first: float | None = None
        self._last: float | None = None
        self._tokens = 0
        self._ttft_recorded = False

    def admitted(self, request_id: str, prompt_tokens: int) -> None:
        self.span.set_attribute("moeserve.request_id", request_id)
        self.span.set_attribute("moeserve.prompt_tokens", prompt_tokens)
        self._tel.input_tokens.add(prompt_tokens)

    def output(self, out) -> None:
        """One engine output (router.sequence.RequestOutput) on its way to the client."""
        now = time.monotonic()
        if out.new_token_ids:
            self._tel.output_tokens.add(len(out.new_token_ids))
            self._first = self._first or now
            self._last = now
            self._tokens += len(out.new_token_ids)
        if out.time_to_first_token is not None and not self._ttft_recorded:
            # Once per request, whatever ends it later; one that ends before its first token has none.
            self._ttft_recorded = True
            self._tel.ttft.record(out.time_to_first_token)
        if out.finished:
            self._finished(out, now)

    def _finished(self, out, now: float) -> None:
        tel, m = self._tel, out.metrics
        reason = out.finish_reason or "unknown"
        tel.requests.add(1, {"finish_reason": reason})
        tel.e2e_latency.record(now - self._start)
        if m is not None and m.first_token_time is not None and m.completion_tokens > 1:
            tel.tpot.record((m.finished_time - m.first_token_time) / (m.completion_tokens - 1))
        elif self._tokens > 1:
            tel.tpot.record((self._last - self._first) / (self._tokens - 1))
        self.span.set_attribute("moeserve.finish_reason", reason)
        self.span.set_attribute("moeserve.completion_tokens", out.completion_tokens)
        if m is not None:
            self._phases(m)

    def _phases(self, m) -> None:
        """Child spans over the engine's timeline (monotonic seconds, mapped onto wall-clock nanoseconds)."""
        offset = time.time_ns() - time.monotonic_ns()
        ns = lambda t: offset + int(t * 1e9)  # noqa: E731
        ctx = set_span_in_context(self.span)
        scheduled = m.first_scheduled_time if m.first_scheduled_time is not None else m.finished_time
        phases = [("queue", m.arrival_time, scheduled, {})]
        if m.first_scheduled_time is not None:
            first = m.first_token_time if m.first_token_time is not None else m.finished_time
            phases.append(("prefill", m.first_scheduled_time, first, {"moeserve.prompt_tokens": m.prompt_tokens}))
        if m.first_token_time is not None:
            phases.append(("decode", m.first_token_time, m.finished_time,
                           {"moeserve.decode_tokens": max(0, m.completion_tokens - 1)}))
        for name, start, end, attrs in phases:
            span = self._tel.tracer.start_span(name, context=ctx, start_time=ns(start), attributes=attrs)
            span.end(end_time=ns(max(start, end)))

    def end(self, code: str | None = None) -> None:
        """The RPC is over: OK (None) or the name of its gRPC status code."""
        self.span.set_attribute("rpc.grpc.status_code", code or "OK")
        if code is not None:
            self._tel.record_error(code)
            self.span.set_status(Status(StatusCode.ERROR, code))
        self.span.end()


def engine_gauges(stats: dict) -> dict[str, float]:
    """The gauges Telemetry exports, from an engine's stats() (router.llm_engine.LLMEngine.stats)."""
    return {
        "queue_depth": stats.get("waiting", 0),
        "running_sequences": stats.get("running", 0),
        "kv_blocks_used": stats.get("kv_blocks_used", 0),
        "kv_blocks_total": stats.get("kv_blocks_total", 0),
        "kv_blocks_cached": stats.get("kv_blocks_cached", 0),
        "prefix_cache_queried_tokens": stats.get("prefix_cache_queried_tokens", 0),
        "prefix_cache_hit_tokens": stats.get("prefix_cache_hit_tokens", 0),
        "draft_tokens": stats.get("draft_tokens", 0),
        "draft_tokens_accepted": stats.get("draft_tokens_accepted", 0),
    }


def _sampler(ratio: float):
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    return ParentBased(TraceIdRatioBased(ratio))
