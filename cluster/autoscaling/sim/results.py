"""The simulator's bookkeeping: replicas of a unit, measurements over one interval, one replay's result."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Unit:
    """Replicas of one scaled unit: serving now, starting (ready times), draining."""

    ready: int
    gpus: int
    startup_s: float
    pending: list[float] = field(default_factory=list)
    draining: int = 0

    @property
    def target(self) -> int:
        return self.ready + len(self.pending)

    @property
    def billed(self) -> int:
        return self.ready + len(self.pending) + self.draining

    def promote(self, now: float) -> bool:
        before = len(self.pending)
        self.pending = [t for t in self.pending if t > now + 1e-9]
        self.ready += before - len(self.pending)
        return before != len(self.pending)

    def scale(self, target: int, now: float, drain: bool) -> None:
        if target > self.target:
            self.pending.extend([now + self.startup_s] * (target - self.target))
            self.pending.sort()
            return
        remove = self.target - target
        while remove and self.pending:  # cancel the starts asked for last
            self.pending.pop()
            remove -= 1
        self.ready -= remove
        if drain:
            self.draining += remove


@dataclass
class Bucket:
    """Measurements over one policy interval."""

    start: float
    arrivals: int = 0
    trunk_busy: float = 0.0
    group_busy: np.ndarray | None = None
    rows: np.ndarray | None = None
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    tokens: float = 0.0


@dataclass
class SimResult:
    """What one replay produced."""

    label: str
    ttft_s: np.ndarray  # per request (nan: never got a first token)
    tpot_s: np.ndarray  # per request (nan: never finished)
    in_slo: np.ndarray  # bool per request
    gpu_hours: float
    duration_s: float
    timeline: dict[str, np.ndarray]  # sampled every interval
    decisions: list[tuple[float, str]]  # (time, "unit a -> b: reason")
    peak: dict[str, int]  # largest target per unit over the replay

    @property
    def slo_attainment(self) -> float:
        return float(self.in_slo.mean()) if self.in_slo.size else 1.0
