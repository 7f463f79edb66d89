"""Decode-size linear layers: the Triton GEMV (kernels/gemv.py) against cuBLAS (F.linear) and the
HBM limit, for the projections a decode step of the benchmark models runs.

Each timed unit is a CUDA graph of one call per weight copy, over enough copies (>= 256 MB in all)
that no call finds its weights in L2, as in a decode step where the other layers' weights pass
through L2 between two uses. The limit is the weight bytes over the copy bandwidth measured in the
same run. Every GEMV launch (tile size, warps) is timed, the default marked.

    python3 benchmarks/bench_gemv.py --rows 1,8 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os

import torch
import torch.nn.functional as F

from moeserve.kernels import gemv
from moeserve.kernels.timing import device_ceilings, graph_ms, save_results

SHAPES = {  # name: (N, K), bf16 weights
    "qwen3-30b-a3b qkv": (5120, 2048),
    "qwen3-30b-a3b o_proj": (2048, 4096),
    "deepseek-v2-lite q + kv_a": (3648, 2048),
    "deepseek-v2-lite o_proj": (2048, 2048),
    "deepseek-v2-lite shared gate/up": (5632, 2048),
    "deepseek-v2-lite shared down": (2048, 2816),
}
TILES = (4096, 8192, 16384)
WARPS = (2, 4, 8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    bandwidth, _ = device_ceilings()
    print(f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e9:.0f} GB/s, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    results = []
    print("| projection | rows | limit us | cuBLAS us | GEMV default us | best GEMV us (tile, warps) | default x cuBLAS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-(256 << 20) // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        limit_us = n * k * 2 / bandwidth * 1e6
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cublas = graph_ms([lambda w=w: F.linear(x, w) for w in weights], reps=args.reps) * 1e3
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
        del weights
    save_results(args.out_dir, "bench_gemv.json", bandwidth, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
