"""Per-expert token counts and busy time of one expert group over a sliding window.

Time is split into buckets of `bucket_s`; the window is the last `window_s` of them. The clock is
passed in (`now`), so the bookkeeping is tested without waiting.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Bucket:
    start: float
    busy_s: float = 0.0
    rows: int = 0
    counts: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [E_local] token counts


class LoadWindow:
    """Token counts per (layer, local expert) and busy seconds, summed over the last `window_s`."""

    def __init__(self, window_s: float = 60.0, bucket_s: float = 1.0):
        if window_s <= 0 or bucket_s <= 0 or bucket_s > window_s:
            raise ValueError(f"LoadWindow: need 0 < bucket_s <= window_s, got bucket_s={bucket_s}, window_s={window_s}")
        self.window_s, self.bucket_s = window_s, bucket_s
        self._buckets: deque[_Bucket] = deque()
        self._lock = threading.Lock()
        self.total_rows = 0
        self.total_busy_s = 0.0
        self._created: float | None = None

    def _bucket(self, now: float) -> _Bucket:
        start = now - (now % self.bucket_s)
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(_Bucket(start))
        self._expire(now)
        return self._buckets[-1]

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0].start + self.bucket_s <= now - self.window_s:
            self._buckets.popleft()

    def record(self, now: float, layer_id: int, counts: np.ndarray, busy_s: float) -> None:
        """Add one batch: `counts[j]` token rows for local expert j at `layer_id`, and its compute time."""
        with self._lock:
            if self._created is None:
                self._created = now
            b = self._bucket(now)
            prev = b.counts.get(layer_id)
            if prev is None or prev.shape[0] < counts.shape[0]:
                grown = np.zeros(counts.shape[0], dtype=np.int64)
                if prev is not None:
                    grown[: prev.shape[0]] = prev
                prev = b.counts[layer_id] = grown
            prev[: counts.shape[0]] += counts
            rows = int(counts.sum())
            b.rows += rows
            b.busy_s += busy_s
            self.total_rows += rows
            self.total_busy_s += busy_s

    def snapshot(self, now: float, experts: tuple[int, ...]) -> dict:
        """{'window_s', 'busy_s', 'busy_share', 'rows', 'per_layer': {layer: {logical expert: tokens}}}."""
        with self._lock:
            self._expire(now)
            per_layer: dict[int, dict[int, int]] = {}
            busy = rows = 0
            for b in self._buckets:
                busy += b.busy_s
                rows += b.rows
                for layer, counts in b.counts.items():
                    dest = per_layer.setdefault(layer, {})
                    for local, c in enumerate(counts.tolist()):
                        if c and local < len(experts):
                            dest[experts[local]] = dest.get(experts[local], 0) + c
            span = min(self.window_s, max(now - (self._created if self._created is not None else now), self.bucket_s))
            return {
                "window_s": self.window_s,
                "busy_s": busy,
                "busy_share": min(1.0, busy / span) if span > 0 else 0.0,
                "rows": rows,
                "per_layer": per_layer,
                "total_rows": self.total_rows,
                "total_busy_s": self.total_busy_s,
            }
