"""The gating router's dispatch and combine: from the trunk's top-k to the expert groups and back.

For one MoE layer: sort the (token, slot) pairs by logical expert, pick one replica per expert from
the placement (balanced, deterministic), send each replica the rows of its experts concurrently,
then put the answers back in pair order and sum them per token.

Exactness. The result is bit-for-bit the single-process `kernels.ops.fused_experts` over all
experts (CPU reference), not merely close: each expert runs on exactly the rows, in exactly the
order, that the single-process path gives it (all rows of one expert go to one replica), a replica
returns per-pair weighted outputs (it runs each pair as a top-1 row, so no partial sum is formed
remotely), and the combine repeats the reference's fp32 index_add over pairs in expert order. It
needs the same BLAS threads on both sides (GroupResources.torch_threads) and 64-byte aligned rows
(H * itemsize % 64 == 0, true of every real model). The price is one row per (token, expert) on
the wire rather than one per (token, group); with k experts spread over many groups the two differ
little.

Epochs. The dispatcher routes a whole step against one serving set. A new set from the controller
is adopted between steps (or at once when idle), and adoption is acknowledged so the controller
knows when a removed replica can no longer receive rows. Only recovery adopts a set mid-step, which
is safe because every replica of an expert computes the same bits.

Failures. Every send has a deadline. A dead, stalled (past the deadline) or draining replica's
experts go to another replica at once when one exists, else to whatever the controller's repair
returns (the restarted replica); experts nobody can serve raise ExpertsUnavailableError.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from moeserve.cluster.placement import ServingSet, assign_targets
from moeserve.experts.batch import ExpertBatch

from .errors import ExpertsUnavailableError
from .transport.base import Pending, ReplicaFailure, Transport

Failures = dict[str, tuple[int, str]]  # replica id -> (incarnation, kind)


class RoutedLoad:
    """Token rows routed per (layer, expert), summed here and handed to telemetry at most once a second,
    so a step costs one list add per layer rather than one metric call per expert."""

    def __init__(self, flush_every_s: float = 1.0):
        self.flush_every_s = flush_every_s
        self._pending: dict[int, list[int]] = {}
        self._last = time.monotonic()

    def add(self, layer_id: int, counts: list[int]) -> None:
        acc = self._pending.get(layer_id)
        self._pending[layer_id] = counts if acc is None else [a + c for a, c in zip(acc, counts)]

    def flush(self, telemetry, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.flush_every_s:
            return
        self._last = now
        pending, self._pending = self._pending, {}
        for layer, counts in pending.items():
            for expert, n in enumerate(counts):
                if n:
                    telemetry.expert_tokens.add(n, {"layer": layer, "expert": expert})


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """Deadlines of the dispatch path."""

    timeout_s: float = 30.0  # one send: past this the replica counts as stalled
    recovery_timeout_s: float = 120.0  # one MoE layer, recoveries included
    max_rounds: int = 6  # re-sends of one MoE layer before giving up

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.recovery_timeout_s < self.timeout_s:
            raise ValueError(f"recovery_timeout_s: must be >= timeout_s ({self.timeout_s}), got {self.recovery_timeout_s}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds: must be >= 1, got {self.max_rounds}")


class PlacementSource(Protocol):
    """Where a dispatcher gets serving sets: the controller (cluster/epoch.py) or a fixed local set."""

    def current(self) -> ServingSet: ...

    def subscribe(self, callback: Callable[[ServingSet], None]) -> None: ...

    def ack(self, epoch: int) -> None: ...

    def report(self, failures: Failures) -> None: ...

    def repair(self, failures: Failures, timeout_s: float) -> ServingSet: ...

    def close(self) -> None: ...


class StaticSource:
    """A serving set nothing changes and nothing repairs (the in-process `local` groups)."""

    def __init__(self, serving: ServingSet):
        self._serving = serving

    def current(self) -> ServingSet:
        return self._serving

    def subscribe(self, callback: Callable[[ServingSet], None]) -> None:
        pass

    def ack(self, epoch: int) -> None:
        pass

    def report(self, failures: Failures) -> None:
        pass

    def repair(self, failures: Failures, timeout_s: float) -> ServingSet:
        return self._serving

    def close(self) -> None:
        pass


@dataclass(slots=True)
class _Send:
    experts: list[int]
    spans: list[list[int]]  # the replica's ranges [lo, hi) of pair positions, ascending
    index: torch.Tensor | None  # those positions as one index tensor, when there is more than one range
    incarnation: int
    deadline: float


class PendingMoE:
    """One MoE layer's dispatch in flight; `wait()` returns the routed-expert output [T, H].

    Everything per pair is laid out once, in pair order (sorted by expert): its token, row, weight and
    expert. An expert's pairs are one range of that order, so a replica's rows are the ranges of its
    experts: a view of the pair-ordered rows when they are adjacent (always, for groups of contiguous
    experts with one replica each), else one gather.
    """

    def __init__(self, dispatcher: "ExpertDispatcher", layer_id: int, hidden: torch.Tensor,
                 topk_ids: torch.Tensor, topk_weights: torch.Tensor, salt: int):
        self.d, self.layer_id, self.hidden, self.salt = dispatcher, layer_id, hidden, salt
        self.started = time.monotonic()
        self.failed: Failures = {}
        self.rounds = 0
        self.outstanding: dict[Pending, _Send] = {}
        serving = dispatcher.serving
        num_experts = serving.placement.num_experts
        flat = topk_ids.reshape(-1)
        # The pair order of kernels.reference.permute: stable sort by expert, pairs not held (-1) last.
        keys = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
        order = torch.argsort(keys, stable=True)
        counts = torch.bincount(keys, minlength=num_experts + 1)[:num_experts].tolist()
        dispatcher.load.add(layer_id, counts)
        order = order[: sum(counts)]
        self.token = order // topk_ids.shape[1]
        self.rows = hidden.index_select(0, self.token)
        self.pair_experts = flat.index_select(0, order)
        self.pair_weights = topk_weights.reshape(-1).index_select(0, order).unsqueeze(1)
        self.slices: dict[int, tuple[int, int]] = {}
        lo = 0
        for e, c in enumerate(counts):
            if c:
                self.slices[e] = (lo, lo + c)
            lo += c
        self.out_pairs = torch.empty_like(self.rows)
        missing = self._send(list(self.slices), serving)
        if missing:
            self._recover(missing, {})

    # --- sending -------------------------------------------------------------------------------
    def _send(self, experts: Iterable[int], serving: ServingSet) -> list[int]:
        """Send the rows of `experts`; returns the experts no live replica can take."""
        exclude = {r for r, (inc, _) in self.failed.items() if serving.incarnations.get(r) == inc}
        rows = {e: self.slices[e][1] - self.slices[e][0] for e in experts}
        targets, missing = assign_targets(serving.placement, rows, exclude=exclude, salt=self.salt)
        if not targets:
            return missing
        # Expert order, so each replica sees its rows in the reference's order; adjacent ranges merge.
        spans: dict[str, list[list[int]]] = {}
        mine: dict[str, list[int]] = {}
        local = [-1] * serving.placement.num_experts
        for e in sorted(targets):
            t = targets[e]
            lo, hi = self.slices[e]
            runs = spans.setdefault(t.replica_id, [])
            if runs and runs[-1][1] == lo:
                runs[-1][1] = hi
            else:
                runs.append([lo, hi])
            mine.setdefault(t.replica_id, []).append(e)
            local[e] = t.local_id
        device = self.hidden.device
        local_ids = torch.tensor(local, dtype=torch.long).to(device, non_blocking=True)[self.pair_experts].unsqueeze(1)
        deadline = time.monotonic() + self.d.config.timeout_s
        for replica_id in sorted(spans):
            runs = spans[replica_id]
            if len(runs) == 1:
                index, (lo, hi) = None, runs[0]
                batch = ExpertBatch(self.layer_id, self.rows[lo:hi], local_ids[lo:hi], self.pair_weights[lo:hi])
            else:
                index = torch.cat([torch.arange(lo, hi) for lo, hi in runs]).to(device, non_blocking=True)
                batch = ExpertBatch(self.layer_id, self.rows.index_select(0, index), local_ids.index_select(0, index),
                                    self.pair_weights.index_select(0, index))
            pending = self.d.transport.send(replica_id, serving.handles[replica_id], batch, device)
            self.outstanding[pending] = _Send(mine[replica_id], runs, index, serving.incarnations[replica_id], deadline)
            self.d.counters["sends"] += 1
            self.d.counters["rows"] += batch.num_rows
        return missing

    def _recover(self, experts: list[int], failures: Failures) -> None:
        """Re-send `experts` after `failures`: to another live replica, else to what repair returns."""
        self.rounds += 1
        self.failed.update(failures)
        self.d.counters["recoveries"] += 1
        remaining = self.started + self.d.config.recovery_timeout_s - time.monotonic()
        if self.rounds > self.d.config.max_rounds or remaining <= 0:
            raise ExpertsUnavailableError(
                experts, f"experts {sorted(experts)} of layer {self.layer_id} got no answer after {self.rounds - 1} "
                f"re-sends ({self.failed}); check `moeserve status`",
            )
        if failures:
            self.d.source.report(failures)
        needs_new_set = any(kind in ("draining", "stale") for _, kind in failures.values())
        missing = experts if needs_new_set else self._send(experts, self.d.serving)
        if missing:
            serving = self.d.repair(self.failed, remaining)
            missing = self._send(missing, serving)
            if missing:
                raise ExpertsUnavailableError(
                    missing, f"experts {sorted(missing)} have no live replica and the controller could not "
                    f"restore one (failures: {self.failed}); check `moeserve status`",
                )

    # --- waiting and combining -------------------------------------------------------------------
    def wait(self) -> torch.Tensor:
        start = time.monotonic()
        try:
            self._collect()
        except BaseException:
            self.d.begin_step()  # the step failed: it is over, so a pending serving set can be adopted
            raise
        finally:
            self.d.expert_wait_s += time.monotonic() - start
        self.d._layer_done(self.layer_id)
        return self._combine()

    def _collect(self) -> None:
        """Every send's rows into out_pairs, re-sending what failed or passed its deadline."""
        transport = self.d.transport
        while self.outstanding:
            now = time.monotonic()
            soonest = min(s.deadline for s in self.outstanding.values())
            done = transport.wait(list(self.outstanding), max(0.0, soonest - now))
            failures: Failures = {}
            redo: list[int] = []
            for pending in done:
                send = self.outstanding.pop(pending)
                try:
                    y = pending.result()
                except ReplicaFailure as f:
                    failures[f.replica_id] = (send.incarnation, f.kind)
                    redo.extend(send.experts)
                    continue
                if send.index is None:
                    lo, hi = send.spans[0]
                    self.out_pairs[lo:hi] = y
                else:
                    self.out_pairs.index_copy_(0, send.index, y)
            now = time.monotonic()
            for pending, send in list(self.outstanding.items()):
                if now >= send.deadline:
                    del self.outstanding[pending]
                    failures[pending.replica_id] = (send.incarnation, "timeout")
                    redo.extend(send.experts)
            if failures:
                self._recover(redo, failures)

    def _combine(self) -> torch.Tensor:
        # kernels.reference.combine, with the weights already applied by the replicas.
        acc = torch.promote_types(self.hidden.dtype, torch.float32)
        out = torch.zeros(self.hidden.shape[0], self.hidden.shape[1], dtype=acc, device=self.hidden.device)
        out.index_add_(0, self.token, self.out_pairs.to(acc))
        return out.to(self.hidden.dtype)


class ExpertDispatcher:
    """The expert backend a model calls per MoE layer: `(layer_id, hidden, topk_ids, topk_weights) -> [T, H]`.

    Called from one thread (the engine's step thread); serving sets arrive from the source's thread.
    """

    def __init__(self, source: PlacementSource, transport: Transport, moe_layers: Iterable[int], *,
                 num_experts: int | None = None, config: DispatchConfig | None = None):
        self.source, self.transport = source, transport
        self.config = config or DispatchConfig()
        self.moe_layers = sorted(set(moe_layers))
        if not self.moe_layers:
            raise ValueError("moe_layers: the model has no MoE layer to dispatch")
        self._lock = threading.Lock()
        self._serving = source.current()
        if num_experts is not None and num_experts != self._serving.placement.num_experts:
            raise ValueError(
                f"num_experts: the model routes over {num_experts} experts but the placement covers "
                f"{self._serving.placement.num_experts}"
            )
        self._next: ServingSet | None = None
        self._in_step = False
        self._last_layer = -1
        self.step = 0
        self.counters = {"sends": 0, "rows": 0, "recoveries": 0, "epochs_adopted": 0}
        # Seconds the calling (step) thread has waited for the expert groups' answers, all told: the
        # engine takes it out of its step time, so that its busy share is the trunk's own work.
        self.expert_wait_s = 0.0
        self.load = RoutedLoad()
        self.telemetry = None  # cluster.telemetry.Telemetry: expert_tokens and scaling_events, if attached
        source.subscribe(self._offer)

    @property
    def serving(self) -> ServingSet:
        return self._serving

    @property
    def epoch(self) -> int:
        return self._serving.epoch

    # --- the backend call ----------------------------------------------------------------------
    def __call__(self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.submit(layer_id, hidden, topk_ids, topk_weights).wait()

    def submit(self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingMoE:
        """Send the layer's rows and return at once; the caller may run shared experts, then `wait()`."""
        self._enter_layer(layer_id)
        try:
            return PendingMoE(self, layer_id, hidden, topk_ids, topk_weights, salt=self.step * 1009 + layer_id)
        except BaseException:
            self.begin_step()  # the step failed: it is over, so a pending serving set can be adopted
            raise

    # --- epochs --------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Mark a step boundary explicitly (also inferred when MoE layer ids stop increasing)."""
        with self._lock:
            self._in_step = False
            self._adopt_next()

    def _enter_layer(self, layer_id: int) -> None:
        with self._lock:
            if not self._in_step or layer_id <= self._last_layer:
                self.step += 1
                self._adopt_next()
            self._in_step = True
            self._last_layer = layer_id

    def attach_telemetry(self, telemetry) -> None:
        """Export routed tokens per (layer, expert) and adopted epochs through `telemetry` from now on."""
        self.telemetry = telemetry

    def _layer_done(self, layer_id: int) -> None:
        if layer_id >= self.moe_layers[-1]:
            if self.telemetry is not None:
                self.load.flush(self.telemetry)
            with self._lock:
                self._in_step = False
                self._adopt_next()

    def _offer(self, serving: ServingSet) -> None:
        """A newer serving set from the source: adopted now between steps, else at the next step."""
        with self._lock:
            if serving.epoch <= self._serving.epoch:
                self.source.ack(self._serving.epoch)
                return
            self._next = serving
            if not self._in_step:
                self._adopt_next()

    def _adopt_next(self) -> None:  # holds self._lock
        nxt, self._next = self._next, None
        if nxt is not None and nxt.epoch > self._serving.epoch:
            self._serving = nxt
            self.transport.retain(nxt.handles)
            self.counters["epochs_adopted"] += 1
            self.source.ack(nxt.epoch)
            if self.telemetry is not None:
                self.telemetry.scaling_events.add(1, {"action": "epoch_adopted"})

    def repair(self, failures: Failures, timeout_s: float) -> ServingSet:
        """Ask the source to restore failed replicas; adopt its answer at once (recovery only)."""
        serving = self.source.repair(failures, timeout_s)
        with self._lock:
            if serving.epoch > self._serving.epoch:
                self._serving = serving
                self.transport.retain(serving.handles)
                self.counters["epochs_adopted"] += 1
                self.source.ack(serving.epoch)
            return self._serving

    def close(self) -> None:
        self.source.close()
        self.transport.close()
