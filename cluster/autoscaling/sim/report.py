"""What `moeserve autoscale simulate` prints: the decisions over time and the side-by-side table."""

from __future__ import annotations

import numpy as np

from ..config import AutoscalingConfig
from .engine import simulate, simulate_static
from .model import ClusterModel
from .results import SimResult
from .trace import Trace


def replay(trace: Trace, model: ClusterModel, config: AutoscalingConfig) -> tuple[SimResult, SimResult]:
    """The policy's replay, and static provisioning at the largest replica counts the policy asked for."""
    policy = simulate(trace, model, config)
    static = simulate_static(trace, model, config, dict(policy.peak), label="static at peak")
    return policy, static


def decision_log(result: SimResult, limit: int | None = None) -> list[str]:
    """One line per change: time, unit, old -> new target and the reason."""
    lines = [f"{_clock(t)}  {line}" for t, line in result.decisions]
    if limit is not None and len(lines) > limit:
        hidden = len(lines) - limit
        lines = lines[:limit] + [f"... {hidden} more (use --decisions 0 for all)"]
    return lines


def comparison_table(results: list[SimResult], slo_ttft_s: float, slo_tpot_s: float) -> list[str]:
    """Rows of GPU-hours, share of requests inside the SLO, latency quantiles and peak GPUs per replay."""
    header = ("replay", "GPU-hours", "in SLO", "TTFT p50", "TTFT p99", "TPOT p99", "peak GPUs", "requests")
    rows = [header]
    for r in results:
        rows.append((
            r.label,
            f"{r.gpu_hours:.1f}",
            f"{100 * r.slo_attainment:.2f}%",
            _seconds(r.ttft_s, 50),
            _seconds(r.ttft_s, 99),
            _seconds(r.tpot_s, 99),
            str(int(r.timeline["gpus"].max())) if r.timeline["gpus"].size else "0",
            str(r.in_slo.size),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = [f"SLO: TTFT <= {slo_ttft_s:g}s and TPOT <= {slo_tpot_s * 1000:g}ms per request"]
    for n, row in enumerate(rows):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _seconds(values: np.ndarray, q: float) -> str:
    finite = values[np.isfinite(values)]
    if finite.size < values.size and q >= 100 * finite.size / max(values.size, 1):
        return "never"  # that quantile lies among requests that never finished
    if finite.size == 0:
        return "-"
    v = float(np.percentile(finite, q))
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.2f}s"


def _clock(t: float) -> str:
    m, s = divmod(int(round(t)), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
