"""Generate the example traces in cluster/traces/ deterministically (seeded numpy, gzip mtime 0).

    python -m moeserve.cluster.autoscaling.sim.tracegen --out cluster/traces

- diurnal: one day's shape compressed into an hour (night trough, morning ramp, afternoon peak,
  evening shoulder); the ramps are 24x steeper than a real day's, start-up delays are not
  compressed, so it is harder for an autoscaler than the day it stands for.
- bursty: a steady base with bursts at random times (3-5x the base within seconds, lasting 1-5
  minutes); burst traffic has longer prompts and skewed routing (a few experts much hotter).
Arrivals are a Poisson process with the given rate, drawn by thinning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .trace import write_trace

HOUR = 3600.0


def _poisson(rate, t_end: float, peak: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of an inhomogeneous Poisson process with rate(t) <= peak on [0, t_end)."""
    n = rng.poisson(peak * t_end * 1.1) + 16
    t = np.cumsum(rng.exponential(1.0 / peak, size=n))
    t = t[t < t_end]
    keep = rng.random(t.size) < rate(t) / peak
    return t[keep]


def _lengths(rng: np.random.Generator, n: int, prompt_median: float, output_median: float) -> tuple[np.ndarray, np.ndarray]:
    prompt = np.clip(np.round(rng.lognormal(np.log(prompt_median), 0.8, n)), 16, 8192).astype(int)
    output = np.clip(np.round(rng.lognormal(np.log(output_median), 0.7, n)), 1, 2048).astype(int)
    return prompt, output


def diurnal(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    low, high = 0.4, 9.0

    def rate(t):
        x = t / HOUR  # fraction of the "day"
        day = 0.5 - 0.5 * np.cos(2 * np.pi * x)  # trough at both ends, peak at mid-day
        shoulder = 0.25 * np.exp(-(((x - 0.8) / 0.06) ** 2))  # evening shoulder
        return low + (high - low) * np.clip(day**1.5 + shoulder, 0, 1)

    t = _poisson(rate, HOUR, high, rng)
    prompt, output = _lengths(rng, t.size, 600, 180)
    return {"arrival_s": t, "prompt_tokens": prompt, "output_tokens": output, "expert_skew": [""] * t.size}


def bursty(seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    base = 1.5
    starts, lengths, heights, rises = [], [], [], []
    t = rng.uniform(120, 300)
    while t < HOUR - 120:
        starts.append(t)
        lengths.append(rng.uniform(60, 300))
        heights.append(base * rng.uniform(3.0, 5.0))
        rises.append(rng.uniform(5, 20))
        t += lengths[-1] + rng.uniform(240, 720)
    starts, lengths, heights, rises = map(np.asarray, (starts, lengths, heights, rises))
    peak = base + heights.max()

    def burst_rate(t):
        t = np.asarray(t)[..., None]
        up = np.clip((t - starts) / rises, 0, 1)
        down = np.clip(1 - (t - starts - lengths) / 30.0, 0, 1)  # 30 s tail
        return (heights * up * down).sum(axis=-1)

    t_all = _poisson(lambda x: base + burst_rate(x), HOUR, peak, rng)
    # Each arrival is burst traffic with probability burst_rate / total rate.
    is_burst = rng.random(t_all.size) < burst_rate(t_all) / (base + burst_rate(t_all))
    prompt, output = _lengths(rng, t_all.size, 600, 180)
    long_prompt, _ = _lengths(rng, t_all.size, 1500, 180)
    prompt = np.where(is_burst, long_prompt, prompt)
    skew = np.where(is_burst, "12:6;40:4;77:3", "").tolist()
    return {"arrival_s": t_all, "prompt_tokens": prompt, "output_tokens": output, "expert_skew": skew}


TRACES = {"diurnal": diurnal, "bursty": bursty}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cluster/traces", help="folder for <name>.csv.gz (default cluster/traces)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in TRACES.items():
        data = make()
        path = out / f"{name}.csv.gz"
        write_trace(path, **data)
        print(f"{path}: {data['arrival_s'].size} arrivals")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
