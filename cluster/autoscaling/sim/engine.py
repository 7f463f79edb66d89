"""Replay a trace through the cluster model, with a policy or with static replica counts.

Time moves in ticks (`tick_s`); inside a tick the engine runs the cluster's steps one by one. A
step is what `router/` does: every trunk worker runs its batch (decode tokens first, prefill
chunks FCFS in the rest of the token budget), then every MoE layer waits for the slowest expert
group, then the next step starts. Admission to batch slots and batch changes happen at tick
edges. The policy runs every `interval_s` on the same kind of `Signals` the live runner builds.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from ..autoscaler import build_policy
from ..config import AutoscalingConfig, Slo
from ..decisions import TRUNK, Decision
from ..policy import PolicyContext
from ..signals import GroupSignals, LatencySummary, Signals
from .model import ClusterModel
from .results import Bucket, SimResult, Unit
from .trace import Trace


class Simulation:
    """One replay. Either `autoscaling` (a policy runs) or `static` (fixed replicas, ready at t=0)."""

    def __init__(
        self,
        trace: Trace,
        model: ClusterModel,
        slo: Slo,
        autoscaling: AutoscalingConfig | None = None,
        static: dict[str, int] | None = None,
        interval_s: float = 10.0,
        window_s: float = 60.0,
        label: str = "",
    ):
        if (autoscaling is None) == (static is None):
            raise ValueError("give exactly one of autoscaling (a policy config) or static (replicas per unit)")
        self.trace, self.model, self.slo = trace, model, slo
        self.config = autoscaling
        self.policy = build_policy(autoscaling) if autoscaling else None
        self.interval_s = autoscaling.interval_s if autoscaling else interval_s
        self.window_s = autoscaling.window_s if autoscaling else window_s
        self.label = label or (f"{autoscaling.policy} policy" if autoscaling else "static")
        self.names = model.group_names
        self.placement = model.placement()
        m, eg = model.model, model.expert_groups
        start = dict(static) if static else {}
        if autoscaling:
            lim = autoscaling.limits
            start = {TRUNK: lim.trunk.clamp(model.trunk.initial_replicas)}
            start.update({g: lim.bounds(g).clamp(eg.initial_replicas) for g in self.names})
        missing = {TRUNK, *self.names} - set(start)
        if missing:
            raise ValueError(f"static replicas missing for {sorted(missing)}")
        self.trunk = Unit(start[TRUNK], model.trunk.gpus_per_replica, model.trunk.startup_s)
        self.groups = {g: Unit(start[g], eg.gpus_per_replica, eg.startup_s) for g in self.names}
        self.home = np.zeros(m.experts, dtype=int)
        for gi, g in enumerate(self.names):
            self.home[list(self.placement[g])] = gi
        # Routing profiles: base popularity times each trace skew, renormalised per layer.
        base = model.base_popularity()
        profiles = []
        for skew in trace.skews:
            mult = np.ones(m.experts)
            for e, w in skew:
                if e < m.experts:
                    mult[e] = w
            p = base * mult
            profiles.append(p / p.sum(axis=1, keepdims=True))
        self.profiles = np.stack(profiles)  # [profile, layer, expert]
        self.redundant: dict[int, list[int]] = {}  # expert -> extra holder groups (serving)
        self.redundant_pending: list[tuple[float, int, int]] = []  # (ready time, expert, group)
        self.state: dict = {}
        n = len(trace)
        self.first_t = np.full(n, np.nan)
        self.done_t = np.full(n, np.nan)
        self.admit_t = np.full(n, np.nan)
        self.prefill_left = trace.prompt_tokens.astype(float).copy()
        self.decode_left = (trace.output_tokens - 1).astype(np.int64)
        self.decisions: list[tuple[float, str]] = []
        self.peak = {TRUNK: self.trunk.target, **{g: u.target for g, u in self.groups.items()}}

    # ---------------------------------------------------------------- routing
    def _holders(self) -> np.ndarray:
        """[expert, group]: share of an expert's rows each group takes (by its replicas)."""
        m = np.zeros((self.model.model.experts, len(self.names)))
        reps = np.array([max(self.groups[g].ready, 0) for g in self.names], dtype=float)
        m[np.arange(m.shape[0]), self.home] = reps[self.home]
        for e, extra in self.redundant.items():
            for gi in extra:
                m[e, gi] = reps[gi]
        tot = m.sum(axis=1, keepdims=True)
        return np.divide(m, tot, out=np.zeros_like(m), where=tot > 0)

    def _route(self, running: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mix of this tick's rows [layer, expert], each replica's share of a layer's rows [layer, group], 1/replicas."""
        weights = np.bincount(self.trace.skew_id[running], minlength=len(self.profiles)).astype(float)
        if weights.sum() == 0:
            weights[0] = 1.0
        mix = np.tensordot(weights / weights.sum(), self.profiles, axes=1)
        share = mix @ self._holders()  # [layer, group]
        inv_reps = 1.0 / np.array([max(self.groups[g].ready, 1) for g in self.names], dtype=float)
        return mix, share * inv_reps, inv_reps

    # ---------------------------------------------------------------- run
    def run(self) -> SimResult:
        tr, mdl = self.trace, self.model
        tick = mdl.tick_s
        end_arrivals = tr.duration_s
        horizon = end_arrivals + mdl.drain_s
        K = mdl.model.top_k
        T = mdl.trunk
        EG = mdl.expert_groups
        n = len(tr)
        arrived = qhead = 0
        prefill: deque[int] = deque()
        dec_idx = np.zeros(0, dtype=np.int64)
        clock = 0.0
        gpu_s = 0.0
        bucket = self._new_bucket(0.0)
        buckets: list[Bucket] = []
        next_decision = self.interval_s
        timeline: dict[str, list] = {k: [] for k in ("t", "arrivals_per_s", "tokens_per_s", "queue", "running", "trunk", "trunk_ready", "gpus")}
        for g in self.names:
            timeline[f"group_{g}"] = []
        t0 = 0.0
        while t0 < horizon:
            t1 = t0 + tick
            # Replicas and redundant copies that finished starting.
            self.trunk.promote(t0)
            for unit in self.groups.values():
                unit.promote(t0)
            self._promote_copies(t0)
            # Arrivals and admission (FCFS, at most the ready trunk's batch slots).
            first_new = arrived
            while arrived < n and tr.arrival_s[arrived] < t1:
                arrived += 1
            bucket.arrivals += arrived - first_new
            running_count = len(prefill) + dec_idx.size
            if self.trunk.draining and running_count <= self.trunk.ready * T.max_sequences:
                self.trunk.draining = 0  # its sequences have finished
            room = self.trunk.ready * T.max_sequences - running_count
            while room > 0 and qhead < arrived:
                a = max(tr.arrival_s[qhead], t0)
                self.admit_t[qhead] = a
                bucket.waits.append(a - tr.arrival_s[qhead])
                prefill.append(qhead)
                qhead += 1
                room -= 1
            serving = self.trunk.ready + self.trunk.draining
            if prefill or dec_idx.size:
                running = np.concatenate([np.fromiter(prefill, dtype=np.int64, count=len(prefill)), dec_idx])
                mix, per_replica, inv_reps = self._route(running)
                overhead = EG.layer_overhead_s * inv_reps  # [group]
                clock = max(clock, t0)
                # Decoders already running finish at a known step of this tick: count them per step.
                left0 = self.decode_left[dec_idx]
                fin = np.bincount(np.minimum(left0, 4096), minlength=4097)
                joiners: list[tuple[int, int]] = []  # (request, first step it decodes in)
                join_fin: dict[int, int] = {}
                step_ends: list[float] = []
                d = dec_idx.size
                budget_total = serving * T.step_token_budget
                tokens_tick = 0.0
                j = 0
                while clock < t1 and (d > 0 or prefill):
                    chunk_budget = budget_total - d
                    used = 0.0
                    done_prefill = []
                    for i in prefill:
                        if used >= chunk_budget or self.admit_t[i] > clock:
                            break
                        take = min(self.prefill_left[i], chunk_budget - used)
                        self.prefill_left[i] -= take
                        used += take
                        if self.prefill_left[i] <= 1e-9:
                            done_prefill.append(i)
                    if d == 0 and used == 0.0:
                        # Nothing admitted has arrived yet: idle until the next admission.
                        nxt = min((self.admit_t[i] for i in prefill), default=t1)
                        clock = max(clock, min(nxt, t1))
                        if clock >= t1:
                            break
                        continue
                    ntok = d + used
                    trunk_t = T.step_overhead_s + (T.decode_token_s * d + T.prefill_token_s * used) / serving
                    # Each MoE layer waits for its slowest replica; the rows of one expert go to one
                    # replica per step, so a group's weight reads split across its replicas like its rows.
                    per_layer = overhead + (EG.row_s * K * ntok) * per_replica  # [layer, group]
                    expert_t = float(per_layer.max(axis=1).sum())
                    dt = trunk_t + expert_t
                    clock += dt
                    step_ends.append(clock)
                    # Trunk busy counts its per-token work only: a continuous-batching engine steps all
                    # the time, so the fixed per-step cost is paid at any load and says nothing about it.
                    bucket.trunk_busy += trunk_t - T.step_overhead_s
                    bucket.group_busy += per_layer.sum(axis=0)
                    tokens_tick += ntok
                    # Sequences whose last token was this step leave the batch...
                    d -= int(fin[j + 1]) if j + 1 < fin.size else 0
                    d -= join_fin.pop(j, 0)
                    # ...and those whose prompt is done decode from the next step on.
                    for i in done_prefill:
                        prefill.popleft()
                        self.first_t[i] = clock
                        bucket.ttft.append(clock - tr.arrival_s[i])
                        if self.decode_left[i] <= 0:
                            self.done_t[i] = clock
                            bucket.tpot.append(0.0)
                        else:
                            joiners.append((i, j + 1))
                            last = j + int(self.decode_left[i])
                            join_fin[last] = join_fin.get(last, 0) + 1
                            d += 1
                    j += 1
                steps = len(step_ends)
                bucket.tokens += tokens_tick
                bucket.rows += mix * (K * tokens_tick)
                ends = np.asarray(step_ends)
                # Decoders from before the tick took part in every step of it.
                if dec_idx.size:
                    done = left0 <= steps
                    fin_idx = dec_idx[done]
                    self.done_t[fin_idx] = ends[left0[done] - 1]
                    self.decode_left[dec_idx] = np.maximum(left0 - steps, 0)
                    dec_idx = dec_idx[~done]
                    self._record_tpot(bucket, fin_idx)
                if joiners:
                    idx = np.array([i for i, _ in joiners], dtype=np.int64)
                    start = np.array([s for _, s in joiners], dtype=np.int64)
                    left = self.decode_left[idx]
                    took = np.maximum(steps - start, 0)
                    done = left <= took
                    self.done_t[idx[done]] = ends[start[done] + left[done] - 1]
                    self.decode_left[idx] = np.maximum(left - took, 0)
                    dec_idx = np.concatenate([dec_idx, idx[~done]])
                    self._record_tpot(bucket, idx[done])
            # Billing over the trace's span.
            if t0 < end_arrivals:
                span = min(t1, end_arrivals) - t0
                gpu_s += span * (self.trunk.billed * self.trunk.gpus + sum(u.billed * u.gpus for u in self.groups.values()))
            t0 = t1
            if t0 + 1e-9 >= next_decision:
                buckets.append(bucket)
                keep = max(1, math.ceil(self.window_s / self.interval_s - 1e-9))
                buckets = buckets[-keep:]
                queue = arrived - qhead
                oldest = (t0 - tr.arrival_s[qhead]) if qhead < arrived else 0.0
                signals = self._signals(t0, buckets, queue, oldest, len(prefill) + dec_idx.size)
                self._sample(timeline, t0, bucket, queue, len(prefill) + dec_idx.size)
                if self.policy is not None:
                    self._apply(signals)
                bucket = self._new_bucket(t0)
                next_decision += self.interval_s
            if t0 >= end_arrivals and qhead >= n and not prefill and dec_idx.size == 0:
                break
        ttft = self.first_t - tr.arrival_s
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(tr.output_tokens > 1, (self.done_t - self.first_t) / np.maximum(tr.output_tokens - 1, 1), 0.0)
        tpot[np.isnan(self.done_t)] = np.nan
        in_slo = (ttft <= self.slo.ttft_s + 1e-9) & (tpot <= self.slo.tpot_s + 1e-9)
        return SimResult(
            label=self.label,
            ttft_s=ttft,
            tpot_s=tpot,
            in_slo=np.nan_to_num(in_slo, nan=False).astype(bool),
            gpu_hours=gpu_s / 3600.0,
            duration_s=end_arrivals,
            timeline={k: np.asarray(v) for k, v in timeline.items()},
            decisions=self.decisions,
            peak=self.peak,
        )

    # ---------------------------------------------------------------- helpers
    def _new_bucket(self, start: float) -> Bucket:
        m = self.model.model
        return Bucket(start=start, group_busy=np.zeros(len(self.names)), rows=np.zeros((m.layers, m.experts)))

    def _record_tpot(self, bucket: Bucket, idx: np.ndarray) -> None:
        if idx.size:
            out = self.trace.output_tokens[idx]
            bucket.tpot.extend(((self.done_t[idx] - self.first_t[idx]) / np.maximum(out - 1, 1)).tolist())

    def _promote_copies(self, now: float) -> None:
        ready = [c for c in self.redundant_pending if c[0] <= now + 1e-9]
        if ready:
            self.redundant_pending = [c for c in self.redundant_pending if c[0] > now + 1e-9]
            for _, e, gi in ready:
                self.redundant.setdefault(e, []).append(gi)

    def _signals(self, now: float, buckets: list[Bucket], queue: int, oldest: float, running: int) -> Signals:
        span = min(self.window_s, max(now, 1e-9))
        busy = sum(b.trunk_busy for b in buckets) / span
        gbusy = sum(b.group_busy for b in buckets) / span
        rows = sum(b.rows for b in buckets)
        copies: dict[int, int] = {e: len(v) for e, v in self.redundant.items() if v}
        for _, e, _g in self.redundant_pending:
            copies[e] = copies.get(e, 0) + 1
        return Signals(
            now_s=now,
            window_s=self.window_s,
            trunk=GroupSignals(self.trunk.ready, len(self.trunk.pending), min(1.0, busy)),
            groups={
                g: GroupSignals(u.ready, len(u.pending), min(1.0, float(gbusy[i])), self.placement[g])
                for i, (g, u) in enumerate(self.groups.items())
            },
            queue_depth=queue,
            oldest_wait_s=oldest,
            queue_wait=LatencySummary.of([w for b in buckets for w in b.waits]),
            ttft=LatencySummary.of([x for b in buckets for x in b.ttft]),
            tpot=LatencySummary.of([x for b in buckets for x in b.tpot]),
            arrivals_per_s=sum(b.arrivals for b in buckets) / span,
            running_sequences=running,
            sequence_capacity=self.trunk.ready * self.model.trunk.max_sequences,
            expert_load=tuple(tuple(r) for r in rows.tolist()),
            redundant=copies,
        )

    def _apply(self, signals: Signals) -> None:
        decision, self.state = self.policy(PolicyContext(signals, self.config, self.state))
        now = signals.now_s
        for line in decision.changes(signals):
            self.decisions.append((now, line))
        self.trunk.scale(decision.trunk.replicas, now, drain=True)
        for g, t in decision.groups.items():
            self.groups[g].scale(t.replicas, now, drain=False)
        self._apply_redundant(decision, signals, now)
        self.peak[TRUNK] = max(self.peak[TRUNK], self.trunk.target)
        for g, u in self.groups.items():
            self.peak[g] = max(self.peak[g], u.target)

    def _apply_redundant(self, decision: Decision, signals: Signals, now: float) -> None:
        eg = self.model.expert_groups
        wanted = dict(decision.redundant)
        # Drop copies no longer wanted (serving or loading), newest first.
        for e in list(self.redundant):
            keep = wanted.get(e, 0)
            self.redundant[e] = self.redundant[e][:keep]
            if not self.redundant[e]:
                del self.redundant[e]
        pending_by_e: dict[int, int] = {}
        kept_pending = []
        for c in self.redundant_pending:
            have = len(self.redundant.get(c[1], [])) + pending_by_e.get(c[1], 0)
            if have < wanted.get(c[1], 0):
                kept_pending.append(c)
                pending_by_e[c[1]] = pending_by_e.get(c[1], 0) + 1
        self.redundant_pending = kept_pending
        used = np.zeros(len(self.names), dtype=int)
        for e, holders in self.redundant.items():
            used[holders] += 1
        for _, e, gi in self.redundant_pending:
            used[gi] += 1
        # Place new copies on the groups with the least load per replica that have free slots.
        load = np.array([g.busy for g in signals.groups.values()])
        for e, copies in wanted.items():
            have = len(self.redundant.get(e, [])) + pending_by_e.get(e, 0)
            taken = set(self.redundant.get(e, [])) | {gi for _, x, gi in self.redundant_pending if x == e} | {self.home[e]}
            for _ in range(copies - have):
                free = [gi for gi in np.argsort(load, kind="stable") if gi not in taken and used[gi] < eg.redundant_slots]
                if not free:
                    break
                gi = int(free[0])
                self.redundant_pending.append((now + eg.copy_s, e, gi))
                taken.add(gi)
                used[gi] += 1

    def _sample(self, timeline: dict, now: float, bucket: Bucket, queue: int, running: int) -> None:
        span = max(now - bucket.start, 1e-9)
        timeline["t"].append(now)
        timeline["arrivals_per_s"].append(bucket.arrivals / span)
        timeline["tokens_per_s"].append(bucket.tokens / span)
        timeline["queue"].append(queue)
        timeline["running"].append(running)
        timeline["trunk"].append(self.trunk.target)
        timeline["trunk_ready"].append(self.trunk.ready)
        timeline["gpus"].append(self.trunk.billed * self.trunk.gpus + sum(u.billed * u.gpus for u in self.groups.values()))
        for g, u in self.groups.items():
            timeline[f"group_{g}"].append(u.target)


def simulate(trace: Trace, model: ClusterModel, config: AutoscalingConfig) -> SimResult:
    """Replay `trace` with the configured policy."""
    return Simulation(trace, model, config.slo, autoscaling=config).run()


def simulate_static(trace: Trace, model: ClusterModel, config: AutoscalingConfig, replicas: dict[str, int], label: str = "static") -> SimResult:
    """Replay `trace` with fixed replicas per unit, all serving from t=0."""
    return Simulation(
        trace, model, config.slo, static=replicas, interval_s=config.interval_s, window_s=config.window_s, label=label
    ).run()
