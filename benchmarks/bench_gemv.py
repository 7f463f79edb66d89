"""Decode-size linear layers: the Triton GEMV and its tensor-core form (kernels/gemv.py) against cuBLAS
(F.linear) and the HBM limit, for the projections a decode step of the benchmark models runs.

Each timed unit is a CUDA graph of one call per weight copy, over enough copies (>= 256 MB in all)
that no call finds its weights in L2, as in a decode step where the other layers' weights pass
through L2 between two uses. The limit is the weight bytes over the copy bandwidth measured in the
same run. Every GEMV launch (tile size, warps) is timed, the default marked; then, at --mma-rows, every
launch of linear_mma (MMA_LAUNCHES) against cuBLAS.

    python3 benchmarks/bench_gemv.py --rows 1,8 --mma-rows 2,8,16 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from moeserve.kernels import gemv
from moeserve.kernels.timing import device_ceilings, graph_ms, save_results

SHAPES = {  # name: (N, K), bf16 weights
    "qwen3-30b-a3b qkv": (5120, 2048),
    "qwen3-30b-a3b o_proj": (2048, 4096),
    "deepseek-v2-lite q + kv_a": (3648, 2048),
    "deepseek-v2-lite o_proj": (2048, 2048),
    "deepseek-v2-lite shared gate/up": (5632, 2048),
    "deepseek-v2-lite shared down": (2048, 2816),
    "deepseek-v2-lite dense gate/up": (21888, 2048),
    "deepseek-v2-lite dense down": (2048, 10944),
}
TILES = (4096, 8192, 16384)
WARPS = (2, 4, 8)
MMA_LAUNCHES = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4,) for st in (3, 4, 6)
                if bn * bk <= 16384]  # (block_n, block_k, warps, stages)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--mma-rows", default="", help="rows at which to time linear_mma's launches (none: skip)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",") if r]
    bandwidth, _ = device_ceilings()
    print(f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e9:.0f} GB/s, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    results = []
    print("| projection | rows | limit us | cuBLAS us | GEMV default us | best GEMV us (tile, warps) | default x cuBLAS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (n, k), weights, limit_us in _projections(bandwidth):
        for m in rows_list if k <= gemv.MAX_K else []:  # the GEMV holds whole rows
            x, cublas = _cublas(m, k, weights, args.reps)
            timed = {}
            for tile, warps in itertools.product(TILES, WARPS):
                calls = [lambda w=w, t=tile, nw=warps: gemv.linear(x, w, tile=t, num_warps=nw) for w in weights]
                timed[(tile, warps)] = graph_ms(calls, reps=args.reps) * 1e3
            best = min(timed, key=timed.get)
            default = timed[(gemv.TILE, gemv.WARPS)]
            err = (gemv.linear(x, weights[0]).float() - F.linear(x.float(), weights[0].float())).norm() / \
                F.linear(x.float(), weights[0].float()).norm()
            results.append(dict(projection=name, n=n, k=k, rows=m, limit_us=limit_us, cublas_us=cublas,
                                gemv_us={f"{t}x{w}": v for (t, w), v in timed.items()}, rel_err=err.item()))
            print(f"| {name} | {m} | {limit_us:.1f} | {cublas:.1f} | {default:.1f} | {timed[best]:.1f} {best} | "
                  f"{cublas / default:.2f} |", flush=True)
    mma_rows = [int(r) for r in args.mma_rows.split(",") if r]
    if mma_rows:
        results += _mma(mma_rows, bandwidth, args.reps)
    save_results(args.out_dir, "bench_gemv.json", bandwidth, results)
    return 0


def _mma(rows_list: list[int], bandwidth: float, reps: int) -> list[dict]:
    """linear_mma's launches against cuBLAS at each row count and shape."""
    results = []
    print("\n| projection | rows | limit us | cuBLAS us | mma default us | best mma us (block_n, block_k, warps, "
          "stages) | cuBLAS / default | cuBLAS / best |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (n, k), weights, limit_us in _projections(bandwidth):
        default = gemv.mma_launch(n)
        for m in rows_list:
            x, cublas = _cublas(m, k, weights, reps)
            timed = {}
            for launch in sorted(set(MMA_LAUNCHES) | {default}):
                calls = [lambda w=w, la=launch: gemv.linear_mma(x, w, launch=la) for w in weights]
                try:
                    timed[launch] = graph_ms(calls, reps=reps) * 1e3
                except OutOfResources:  # more shared memory than the GPU has
                    continue
            best = min(timed, key=timed.get)
            want = F.linear(x.float(), weights[0].float())
            err = ((gemv.linear_mma(x, weights[0], launch=default).float() - want).norm() / want.norm()).item()
            results.append(dict(projection=name, n=n, k=k, rows=m, kernel="linear_mma", limit_us=limit_us,
                                cublas_us=cublas, mma_us={"x".join(map(str, c)): v for c, v in timed.items()},
                                rel_err=err))
            print(f"| {name} | {m} | {limit_us:.1f} | {cublas:.1f} | {timed[default]:.1f} | {timed[best]:.1f} "
                  f"{best} | {cublas / timed[default]:.2f} | {cublas / timed[best]:.2f} |", flush=True)
    return results


def _projections(bandwidth: float):
    """(name, (N, K), weight copies, limit us) for each projection of SHAPES, one at a time (the copies of
    one hold >= 256 MB: freed before the next)."""
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-(256 << 20) // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        yield name, (n, k), weights, n * k * 2 / bandwidth * 1e6
        del weights


def _cublas(m: int, k: int, weights: list[torch.Tensor], reps: int) -> tuple[torch.Tensor, float]:
    """Random rows x [m, k] and cuBLAS's us per call over the weight copies."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return x, graph_ms([lambda w=w: F.linear(x, w) for w in weights], reps=reps) * 1e3


if __name__ == "__main__":
    raise SystemExit(main())
