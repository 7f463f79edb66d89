"""GPU timing for the kernel benchmark and autotuner: device events around CUDA-graph replays.

Each timed unit is a list of calls over different inputs (routings drawn afresh), run back to back,
so that repeated runs do not find the same experts' weights in L2. Launch gaps count, as in a
serving step; a graph removes the Python launch cost that a captured decode step does not pay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def _median_ms(run: Callable[[], object], reps: int) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def eager_ms(calls: Sequence[Callable[[], object]], reps: int = 20, warmup: int = 2) -> float:
    """Median milliseconds per call, launching from Python each time."""
    def run():
        for c in calls:
            c()

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    return _median_ms(run, reps) / len(calls)


def capture(calls: Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """One CUDA graph that runs every call once (after a warm-up on a side stream, as capture needs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return graph


def graph_ms(calls: Sequence[Callable[[], object]], reps: int = 20, warmup: int = 2) -> float:
    """Median milliseconds per call over replays of one captured graph of all calls."""
    graph = capture(calls)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    ms = _median_ms(graph.replay, reps) / len(calls)
    del graph
    return ms


def runoff(options: dict[str, Callable[[], float]], rounds: int = 3) -> tuple[str, dict[str, float]]:
    """The option with the lowest median time, and every option's median: each is timed `rounds`
    times, interleaved (a, b, a, b, ...), so that clock or thermal drift over the run falls on all of
    them alike, and one slow round does not decide. For close calls between timings taken minutes
    apart (the autotuner's current entry against its best candidate)."""
    times: dict[str, list[float]] = {name: [] for name in options}
    for _ in range(rounds):
        for name, time_one in options.items():
            times[name].append(time_one())
    medians = {name: statistics.median(t) for name, t in times.items()}
    return min(medians, key=medians.__getitem__), medians


def device_ceilings(copy_bytes: int = 1 << 30, matmul_n: int = 8192, reps: int = 10) -> tuple[float, float]:
    """Measured (bandwidth in bytes/s counting reads and writes, bf16 matmul FLOP/s) on random data."""
    src = torch.randn(copy_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    copy = eager_ms([lambda: dst.copy_(src)], reps=reps, warmup=3)
    bandwidth = 2 * copy_bytes / (copy * 1e-3)
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.bfloat16)
    mm = eager_ms([lambda: a @ b], reps=reps, warmup=3)
    peak = 2 * matmul_n**3 / (mm * 1e-3)
    return bandwidth, peak


def gpu_benchmark_parser(doc: str, tokens: str, buffers: int) -> argparse.ArgumentParser:
    """The options every one-script kernel benchmark takes: token counts, hidden size, how many distinct
    inputs a graph cycles through, replays, and where the JSON goes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=tokens)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--buffers", type=int, default=buffers, help="distinct inputs a graph cycles through")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out-dir", default=None)
    return p


def open_gpu_benchmark(script: str) -> tuple[float, float] | None:
    """The start of a one-script GPU benchmark: None (with a message) without a CUDA device, else the
    ceilings measured now (device_ceilings), after printing them with the device's name."""
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA device", file=sys.stderr)
        return None
    bandwidth, peak = device_ceilings()
    print(f"device {torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s",
          flush=True)
    return bandwidth, peak


def save_results(out_dir: str | Path, name: str, bandwidth: float, results: list) -> Path:
    """A GPU benchmark's rows as out_dir/name (JSON), with the device's name and the copy bandwidth
    measured in the same run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bytes_per_s=bandwidth,
                                    results=results), indent=1))
    return path
