"""What a chaos run counts, and the report it prints. Pure: outcomes and fault windows in, figures out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# How one request ended (see `classify`).
SUCCEEDED, MISMATCHED, FAILED, EXPIRED, LOST = "succeeded", "mismatched", "failed", "expired", "lost"


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it."""

    index: int
    prompt_index: int
    start: float  # monotonic seconds
    end: float | None = None  # None: never answered
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # of the last message; None if no message carried one
    code: str = "OK"  # gRPC status name at the end of the call
    detail: str = ""
    cached_prompt_tokens: int = 0  # the usage of its last message: prompt tokens read from the prefix cache


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One injected fault: what, on which target, and from injection until recovery was seen."""

    kind: str
    target: str
    start: float
    end: float
    detail: str = ""


def classify(outcome: Outcome, expected: list[int]) -> str:
    """succeeded (right tokens), mismatched (finished, wrong tokens), failed, expired (own deadline), lost.

    Lost: never answered, or the stream ended cleanly without saying why it finished.
    """
    if outcome.end is None:
        return LOST
    if outcome.code == "DEADLINE_EXCEEDED":
        return EXPIRED
    if outcome.code != "OK" or outcome.finish_reason == "cancelled":
        return FAILED
    if outcome.finish_reason is None:
        return LOST
    return SUCCEEDED if outcome.tokens == expected else MISMATCHED


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def overlaps(outcome: Outcome, faults: list[FaultRecord]) -> bool:
    end = outcome.end if outcome.end is not None else math.inf
    return any(outcome.start <= f.end and end >= f.start for f in faults)


@dataclass(frozen=True, slots=True)
class ChaosReport:
    scenario: str
    sent: int
    succeeded: int
    failed: int
    expired: int
    lost: int
    mismatched: int
    faults: int
    fault_kinds: tuple[str, ...]
    p99_during_faults_s: float | None
    p99_without_faults_s: float | None
    duration_s: float
    mean_recovery_s: float | None
    cached_prompt_tokens: int = 0  # summed over the requests: prompt tokens the servers read from their prefix caches
    problems: tuple[str, ...] = ()  # the first few requests that did not succeed, and fault errors
    recoveries: tuple[str, ...] = ()  # per fault: target, time to recovery, what the fault did

    @property
    def ok(self) -> bool:
        """The bar of the chaos suite: nothing lost, mismatched or failed (own-deadline expiries aside)."""
        return self.lost == 0 and self.mismatched == 0 and self.failed == 0 and not self.problems_in_faults

    @property
    def problems_in_faults(self) -> bool:
        return any(p.startswith("fault:") for p in self.problems)

    def format(self) -> str:
        def secs(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"

        lines = [
            f"scenario {self.scenario}: {'PASS' if self.ok else 'FAIL'}",
            f"  requests sent {self.sent}, succeeded {self.succeeded}, failed {self.failed}, lost {self.lost}, "
            f"mismatched {self.mismatched}, deadline expired {self.expired}",
            f"  faults {self.faults} ({', '.join(sorted(set(self.fault_kinds))) or 'none'}), "
            f"mean recovery {secs(self.mean_recovery_s)}",
            f"  p99 latency during faults {secs(self.p99_during_faults_s)}, "
            f"outside faults {secs(self.p99_without_faults_s)}, run {self.duration_s:.1f}s",
            f"  prompt tokens read from the prefix cache {self.cached_prompt_tokens}",
        ]
        if self.recoveries:
            lines.append(f"  each fault: {', '.join(self.recoveries)}")
        lines += [f"  ! {p}" for p in self.problems]
        return "\n".join(lines)


def build_report(scenario: str, outcomes: list[Outcome], expected: list[list[int]], faults: list[FaultRecord],
                 duration_s: float, fault_errors: list[str] = (), max_problems: int = 8) -> ChaosReport:
    """Count the outcomes against the fault-free outputs (expected[prompt_index])."""
    counts = {k: 0 for k in (SUCCEEDED, MISMATCHED, FAILED, EXPIRED, LOST)}
    problems: list[str] = [f"fault: {e}" for e in fault_errors]
    during, outside = [], []
    for o in outcomes:
        verdict = classify(o, expected[o.prompt_index])
        counts[verdict] += 1
        if verdict != SUCCEEDED and len(problems) < max_problems:
            problems.append(f"request {o.index} {verdict}: code {o.code}, finish {o.finish_reason}, "
                            f"{len(o.tokens)} tokens {o.detail}".rstrip())
        if o.end is not None:
            (during if overlaps(o, faults) else outside).append(o.end - o.start)
    recoveries = [f.end - f.start for f in faults]
    return ChaosReport(
        scenario=scenario, sent=len(outcomes), succeeded=counts[SUCCEEDED], failed=counts[FAILED],
        expired=counts[EXPIRED], lost=counts[LOST], mismatched=counts[MISMATCHED], faults=len(faults),
        fault_kinds=tuple(f.kind for f in faults), p99_during_faults_s=percentile(during, 99),
        p99_without_faults_s=percentile(outside, 99), duration_s=duration_s,
        mean_recovery_s=sum(recoveries) / len(recoveries) if recoveries else None,
        cached_prompt_tokens=sum(o.cached_prompt_tokens for o in outcomes), problems=tuple(problems),
        recoveries=tuple(f"{f.target} {f.end - f.start:.1f}s" + (f" [{f.detail}]" if f.detail else "") for f in faults),
    )
