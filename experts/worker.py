"""One expert group's state and compute, free of Ray: the `local` transport runs it in-process and the
Ray actor (experts/group.py) wraps it.

It holds w13/w2 of its experts for every MoE layer, runs a batch through `kernels.ops.fused_experts`
and returns the weighted sums per row, counts tokens per expert, and drains: once draining it takes
no new batch, and `wait_drained` returns when the ones it holds are done.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from moeserve.kernels import ops

from .batch import ExpertBatch
from .errors import GroupDrainingError, StaleRoutingError
from .load import LoadWindow
from .weights import ExpertWeights


class ExpertGroupWorker:
    """The experts of one group (all MoE layers) on one device."""

    def __init__(self, group_id: int, experts: tuple[int, ...], source, device: torch.device | str = "cpu",
                 *, load_window_s: float = 60.0):
        self.group_id = group_id
        self.device = torch.device(device)
        self.source = source
        self._lock = threading.Condition()
        self._experts = tuple(experts)
        self._weights: ExpertWeights = source.load(list(experts), self.device)
        self._in_flight = 0
        self._draining = False
        self._running_since: float | None = None
        self._delay_s = 0.0
        self.load = LoadWindow(window_s=load_window_s, bucket_s=min(1.0, load_window_s))

    @property
    def experts(self) -> tuple[int, ...]:
        return self._experts

    @property
    def layers(self) -> list[int]:
        return sorted(self._weights)

    # --- compute ------------------------------------------------------------------------------
    def run(self, batch: ExpertBatch) -> torch.Tensor:
        """Weighted sum over each row's local experts: [N, H] in the rows' dtype."""
        with self._lock:
            if self._draining:
                raise GroupDrainingError(f"expert group {self.group_id} is draining")
            self._in_flight += 1
            weights = self._weights
            num_local = len(self._experts)
            delay = self._delay_s
        start = time.monotonic()
        try:
            with self._lock:
                self._running_since = start
            if delay:
                threading.Event().wait(delay)  # injected fault (chaos): a slow or stalled group
            if batch.layer_id not in weights:
                raise StaleRoutingError(f"expert group {self.group_id} has no MoE layer {batch.layer_id}")
            ids = batch.local_ids.to(self.device)
            if ids.numel() and int(ids.max()) >= num_local:
                raise StaleRoutingError(
                    f"expert group {self.group_id} holds {num_local} experts; got local id {int(ids.max())}"
                )
            w13, w2 = weights[batch.layer_id]
            rows = batch.rows.to(self.device)
            out = ops.fused_experts(rows, w13, w2, ids, batch.weights.to(self.device))
            flat = ids.reshape(-1)
            counts = torch.bincount(flat[flat >= 0], minlength=num_local).cpu().numpy().astype(np.int64)
            if out.device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # busy time must cover the kernels, not their launch
            end = time.monotonic()
            self.load.record(end, batch.layer_id, counts, end - start)
            return out
        finally:
            with self._lock:
                self._in_flight -= 1
                self._running_since = None
                self._lock.notify_all()

    # --- changing the experts held ----------------------------------------------------------------
    def add_experts(self, experts: list[int]) -> tuple[int, ...]:
        """Load and append experts (existing local ids stay valid); returns the experts now held."""
        new = [e for e in experts if e not in self._experts]
        if not new:
            return self._experts
        loaded = self.source.load(new, self.device)
        with self._lock:
            merged = {}
            for layer, (w13, w2) in self._weights.items():
                a13, a2 = loaded[layer]
                merged[layer] = (torch.cat([w13, a13]), torch.cat([w2, a2]))
            self._weights = merged  # batches in flight keep the old tuple; their local ids are still valid there
            self._experts = self._experts + tuple(new)
        return self._experts

    # --- lifecycle ---------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        with self._lock:
            self._draining = True

    def wait_drained(self, timeout_s: float) -> bool:
        """True once no batch is held (after begin_drain); False if `timeout_s` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)

    def inject_delay(self, seconds: float) -> None:
        """Fault injection for the chaos suite: every following batch waits `seconds` first (0 = off)."""
        with self._lock:
            self._delay_s = max(0.0, float(seconds))

    def health(self) -> dict:
        now = time.monotonic()
        with self._lock:
            running = None if self._running_since is None else now - self._running_since
            return {
                "group_id": self.group_id,
                "draining": self._draining,
                "in_flight": self._in_flight,
                "running_for_s": running,
                "num_experts": len(self._experts),
            }

    def stats(self) -> dict:
        snap = self.load.snapshot(time.monotonic(), self._experts)
        snap.update(group_id=self.group_id, experts=list(self._experts), device=str(self.device))
        return snap
