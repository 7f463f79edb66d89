"""The replay as a PNG: load, replicas and GPUs, and the share of requests inside the SLO, over time.

matplotlib is optional (`pip install moeserve[plot]`); it is imported only here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .results import SimResult


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("writing the plot needs matplotlib: pip install 'moeserve[plot]' (or pass --no-plot)") from None
    return plt


def slo_share_over_time(result: SimResult, arrival_s: np.ndarray, bin_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Share of requests inside the SLO, by arrival time in bins of `bin_s` (nan where none arrived)."""
    edges = np.arange(0.0, max(float(arrival_s.max(initial=0.0)), bin_s) + bin_s, bin_s)
    idx = np.clip(np.digitize(arrival_s, edges) - 1, 0, edges.size - 2)
    total = np.bincount(idx, minlength=edges.size - 1)
    ok = np.bincount(idx, weights=result.in_slo.astype(float), minlength=edges.size - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, ok / total, np.nan)
    return edges[:-1] + bin_s / 2, share


def plot_replay(policy: SimResult, static: SimResult, arrival_s: np.ndarray, path: str | Path, title: str) -> Path:
    """Write the three-panel figure to `path` (PNG) and return it."""
    plt = _pyplot()
    path = Path(path)
    tl = policy.timeline
    minutes = tl["t"] / 60.0
    fig, (load, reps, slo) = plt.subplots(3, 1, figsize=(10, 8), sharex=True, height_ratios=(1, 1.3, 0.8))
    load.plot(minutes, tl["arrivals_per_s"], color="tab:gray", lw=1, label="arrivals / s")
    load.set_ylabel("requests / s")
    running = load.twinx()
    running.plot(minutes, tl["running"], color="tab:purple", lw=1, alpha=0.7, label="running sequences")
    running.set_ylabel("running sequences")
    load.legend(loc="upper left", fontsize=8)
    running.legend(loc="upper right", fontsize=8)
    load.set_title(title)

    groups = [k for k in tl if k.startswith("group_")]
    expert = sum(tl[g] for g in groups) if groups else np.zeros_like(minutes)
    reps.step(minutes, tl["gpus"], where="post", color="tab:blue", lw=1.5, label=f"GPUs, {policy.label}")
    reps.step(static.timeline["t"] / 60.0, static.timeline["gpus"], where="post", color="tab:red", lw=1.2, ls="--", label="GPUs, static at peak")
    reps.step(minutes, expert, where="post", color="tab:green", lw=1, label="expert-group replicas (all groups)")
    reps.step(minutes, tl["trunk"], where="post", color="tab:orange", lw=1, label="trunk replicas")
    reps.set_ylabel("replicas / GPUs")
    reps.set_ylim(bottom=0)
    reps.legend(loc="upper left", fontsize=8, ncol=2)

    for result, color, ls in ((policy, "tab:blue", "-"), (static, "tab:red", "--")):
        centres, share = slo_share_over_time(result, arrival_s, 60.0)
        slo.plot(centres / 60.0, 100 * share, color=color, ls=ls, lw=1.2,
                 label=f"{result.label}: {100 * result.slo_attainment:.2f}% overall")
    slo.axhline(99, color="black", lw=0.6, ls=":")
    lowest = np.nanmin(100 * slo_share_over_time(policy, arrival_s, 60.0)[1], initial=100.0)
    slo.set_ylim(min(lowest - 2, 97), 100.5)
    slo.set_ylabel("% in SLO (per minute)")
    slo.set_xlabel("minutes")
    slo.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
