"""The edge's live serving figures for `moeserve status`: the batch and the KV cache now, token and
request rates and TTFT/TPOT percentiles over a sliding window.

`ServingFigures` reads the engine's stats() (counters and gauges, always there) and, when the server
runs with telemetry, the TTFT/TPOT histograms of its `Telemetry`. Rates and percentiles are the
difference between now and a reading at least `window_s` old (or the first reading, while the
server is younger), so they say how the server is doing lately, not since it started.
`ReadingWindow` keeps those readings; the autoscaler's trunk report (autoscaling/runner.py) uses it too.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_HISTOGRAMS = {"ttft": "ttft_seconds", "tpot": "tpot_seconds"}
_RATES = {"input_tokens_per_s": "prompt_tokens", "output_tokens_per_s": "tokens_generated",
          "requests_per_s": "requests_finished"}
_CACHE = ("prefix_cache_hit_tokens", "prefix_cache_queried_tokens")
_DRAFTS = ("draft_tokens_accepted", "draft_tokens")
_MIN_SPACING_S = 1.0  # readings kept at most this often, so the history stays small however often status is asked


def bucket_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float:
    """The q-quantile of a bucketed distribution, linear within its bucket (as Prometheus' histogram_quantile).

    `counts` has one bucket more than `bounds` (+Inf); a quantile there is the largest finite bound.
    """
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(bounds):
                return float(bounds[-1]) if bounds else 0.0
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return float(bounds[-1]) if bounds else 0.0


def latency_summary(bounds: Sequence[float], counts: Sequence[int], total_s: float) -> dict[str, float]:
    """count, mean_s and p50/p90/p99 (seconds) of one window's histogram deltas."""
    n = sum(counts)
    if n <= 0:
        return {"count": 0, "mean_s": 0.0, "p50_s": 0.0, "p90_s": 0.0, "p99_s": 0.0}
    return {"count": n, "mean_s": total_s / n,
            **{f"p{round(q * 100)}_s": bucket_quantile(q, bounds, counts) for q in (0.5, 0.9, 0.99)}}


@dataclass
class _Reading:
    t: float
    counters: dict[str, float]
    histograms: dict[str, Any] = field(default_factory=dict)  # name -> telemetry.HistogramData


class ReadingWindow:
    """Readings of cumulative figures (anything with a time `t`), kept so each new one is compared with
    the newest at least `window_s` older (else the oldest there is, while the history is younger)."""

    def __init__(self, first: Any, window_s: float, min_spacing_s: float = _MIN_SPACING_S):
        if window_s <= 0:
            raise ValueError(f"window_s: must be > 0, got {window_s}")
        self.window_s, self._min_spacing_s = window_s, min_spacing_s
        self._lock = threading.Lock()
        self._history: deque = deque([first])

    def base(self, now: Any) -> Any:
        """The reading to compare `now` with; `now` joins the history if the last one is old enough."""
        with self._lock:
            history = self._history
            while len(history) > 1 and now.t - history[1].t >= self.window_s:
                history.popleft()
            base = history[0]
            if now.t - history[-1].t >= self._min_spacing_s:
                history.append(now)
        return base


class ServingFigures:
    """Callable: the live figures of one engine as a dict (the fields of admin.proto's ServingStatus)."""

    def __init__(self, engine: Any, telemetry: Any = None, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self._engine, self._telemetry, self.window_s, self._clock = engine, telemetry, window_s, clock
        self._window = ReadingWindow(self._reading(engine.stats()), window_s)

    def _reading(self, stats: dict) -> _Reading:
        hist = self._telemetry.histograms(*_HISTOGRAMS.values()) if self._telemetry is not None else {}
        return _Reading(self._clock(), {k: float(stats.get(k, 0)) for k in (*_RATES.values(), *_CACHE, *_DRAFTS)}, hist)

    def __call__(self) -> dict[str, Any]:
        stats = self._engine.stats()
        now = self._reading(stats)
        base = self._window.base(now)
        span = max(now.t - base.t, 1e-9)
        figures: dict[str, Any] = {
            "running": int(stats.get("running", 0)),
            "waiting": int(stats.get("waiting", 0)),
            "kv_blocks_used": int(stats.get("kv_blocks_used", 0)),
            "kv_blocks_total": int(stats.get("kv_blocks_total", 0)),
            "window_s": now.t - base.t,
            # A TrunkPool's workers (serve --trunk-workers); absent (0) with the trunk in the edge's process.
            **{k: int(stats.get(k, 0)) for k in ("trunk_workers", "trunk_workers_starting", "trunk_workers_draining")},
        }
        for name, counter in _RATES.items():
            # A restarted trunk worker starts its counters again: never report a negative rate.
            figures[name] = max(0.0, now.counters[counter] - base.counters[counter]) / span
        hit, queried = (max(0.0, now.counters[k] - base.counters[k]) for k in _CACHE)
        figures["prefix_cache_hit_rate"] = min(1.0, hit / queried) if queried else 0.0
        kept, drafted = (max(0.0, now.counters[k] - base.counters[k]) for k in _DRAFTS)
        figures["draft_tokens_per_s"] = drafted / span
        figures["draft_acceptance_rate"] = min(1.0, kept / drafted) if drafted else 0.0
        if self._telemetry is not None:
            for name, metric in _HISTOGRAMS.items():
                figures[name] = _window_latency(base.histograms.get(metric), now.histograms.get(metric))
        return figures


def histogram_delta(before, after) -> tuple[Sequence[float], list[int], float]:
    """Bounds, bucket counts and sum of what `after` (telemetry.HistogramData) recorded since `before`.

    None for `after` is a histogram nothing was recorded in; None for `before`, one read before the first.
    """
    if after is None:
        return (), [0], 0.0
    if before is None:
        return after.bounds, list(after.counts), after.sum
    counts = [max(0, a - b) for a, b in zip(after.counts, before.counts)]
    return after.bounds, counts, max(0.0, after.sum - before.sum)


def _window_latency(before, after) -> dict[str, float]:
    """The latency summary of what `after` (telemetry.HistogramData) recorded since `before`."""
    return latency_summary(*histogram_delta(before, after))
