"""What a policy sees: one snapshot of the serving cluster over a sliding window.

The live runner builds it from the controller's metrics, the simulator from its cluster model; a
policy cannot tell which, and never reads a clock: `now_s` is part of the snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

QUANTILES = ("p50", "p95", "p99")


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Quantiles of one latency over the window; `count == 0` means nothing was observed."""

    count: int = 0
    p50_s: float = 0.0
    p95_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0

    @classmethod
    def of(cls, samples: Sequence[float] | np.ndarray) -> LatencySummary:
        values = np.asarray(samples, dtype=float)
        if values.size == 0:
            return cls()
        p50, p95, p99 = np.quantile(values, (0.5, 0.95, 0.99))
        return cls(int(values.size), float(p50), float(p95), float(p99), float(values.max()))

    def quantile(self, name: str) -> float:
        """The named quantile ('p50', 'p95', 'p99'), 0.0 when nothing was observed."""
        if name not in QUANTILES:
            raise ValueError(f"unknown quantile {name!r}; allowed: {', '.join(QUANTILES)}")
        return getattr(self, f"{name}_s")


@dataclass(frozen=True, slots=True)
class GroupSignals:
    """One scaled unit: the trunk workers or one expert group."""

    replicas: int  # ready and serving
    pending: int = 0  # asked for, still starting
    busy: float = 0.0  # mean share of wall time its replicas computed over the window, 0..1
    experts: tuple[int, ...] = ()  # logical experts it holds (empty for the trunk)

    @property
    def target(self) -> int:
        """The replica count the cluster is moving to (ready plus starting)."""
        return self.replicas + self.pending


@dataclass(frozen=True, slots=True)
class Signals:
    """One observation of the cluster, the input of every policy."""

    now_s: float  # observation time (seconds on any monotonic clock; only differences matter)
    window_s: float  # length of the sliding window the rates and quantiles cover
    trunk: GroupSignals
    groups: Mapping[str, GroupSignals]  # expert group name -> its signals, placement included
    queue_depth: int = 0  # requests waiting for the batcher to admit them
    oldest_wait_s: float = 0.0  # age of the oldest waiting request now
    queue_wait: LatencySummary = LatencySummary()  # waits of requests admitted in the window
    ttft: LatencySummary = LatencySummary()  # first tokens emitted in the window
    tpot: LatencySummary = LatencySummary()  # requests finished in the window, mean time per output token
    arrivals_per_s: float = 0.0
    running_sequences: int = 0  # sequences holding a batch slot (prefill or decode)
    sequence_capacity: int = 0  # batch slots of the ready trunk workers
    # token rows routed to each logical expert over the window, [layer][expert]
    expert_load: tuple[tuple[float, ...], ...] = ()
    redundant: Mapping[int, int] = field(default_factory=dict)  # expert -> extra copies

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError(f"window_s: must be > 0, got {self.window_s}")
        if "trunk" in self.groups:
            raise ValueError("groups: 'trunk' names the trunk workers and cannot name an expert group")
        object.__setattr__(self, "groups", dict(self.groups))
        object.__setattr__(self, "redundant", dict(self.redundant))

    @property
    def sequence_utilisation(self) -> float:
        """Share of the trunk's batch slots in use, counting the queue as demand for slots."""
        if self.sequence_capacity <= 0:
            return 1.0 if self.running_sequences or self.queue_depth else 0.0
        return (self.running_sequences + self.queue_depth) / self.sequence_capacity

    def expert_shares(self) -> np.ndarray:
        """Per-layer share of routed rows per expert, [layer, expert]; rows sum to 1 (or 0 if idle)."""
        load = np.asarray(self.expert_load, dtype=float)
        if load.size == 0:
            return load.reshape(0, 0)
        totals = load.sum(axis=1, keepdims=True)
        return np.divide(load, totals, out=np.zeros_like(load), where=totals > 0)
