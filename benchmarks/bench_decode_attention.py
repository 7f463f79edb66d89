"""Paged decode attention (kernels/decode_attention.py): every launch choice of the split kernel
(rows per step, warps, stages, programs aimed for, positions a split takes at least) timed at the
benchmark models' decode shapes, against the HBM limit (every cached row read once).

Each timed unit is a CUDA graph of calls over distinct caches (>= 256 MB in all), so no call finds
its rows in L2, as in a decode step. The default launch is marked. --settled launches as the models
do in a decode step (no call writes what the next one reads, so the promise holds here too).

    python3 benchmarks/bench_decode_attention.py --batches 1,16,64 --context 320 --out-dir $OUT
    python3 benchmarks/bench_decode_attention.py --grids 0 --settled --batches 1,16,64 --context 320
    python3 benchmarks/bench_decode_attention.py --settled --batches 16 --context 300 --launch-len 512  # as graphed
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os

import torch

from moeserve.kernels import decode_attention as da
from moeserve.kernels.timing import device_ceilings, graph_ms, save_results

MODELS = {  # name: (query heads, KV heads, key width, value width); MLA: one latent "head", values from keys
    "deepseek-v2-lite (MLA)": (16, 1, 576, 512),
    "qwen3-30b-a3b": (32, 4, 128, 128),
}
# Three grids: many short splits and a merge launch (min_chunk 0); fewer, longer ones (a context within
# min_chunk positions is one split, written without the merge); short splits merged by the last of each
# group (fused_merge: no merge launch).
CHOICES = [dict(block_n=(16, 32, 64), num_warps=(4, 8), num_stages=(1, 2, 3), target_programs=(132, 264, 528),
                min_chunk=(0,)),
           dict(block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3), target_programs=(528,),
                min_chunk=(128, 256, 512, 1024)),
           dict(block_n=(16, 32, 64), num_warps=(4, 8), num_stages=(2, 3), target_programs=(132, 264, 528),
                min_chunk=(0,), fused_merge=(True,))]


def launches(grids: list[int], default: da.Launch) -> list[da.Launch]:
    """The launches of the chosen grids, the default first."""
    picked = [da.Launch(**dict(zip(CHOICES[g], values)))
              for g in grids for values in itertools.product(*CHOICES[g].values())]
    return [default] + [la for la in picked if la != default]


def _problem(b: int, ctx: int, hq: int, hk: int, dk: int, dv: int, bound: int, page: int = 16):
    """b sequences of ctx cached tokens in shuffled blocks; the tables padded with block 0 up to `bound` tokens,
    as a decode graph's are up to its context bucket."""
    blocks = b * -(-ctx // page)
    k = torch.randn(blocks, page, hk, dk, device="cuda", dtype=torch.bfloat16)
    v = k[..., :dv] if dv < dk else torch.randn(blocks, page, hk, dv, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(b, -1)
    tables = torch.nn.functional.pad(tables, (0, -(-bound // page) - tables.shape[1]))
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(b, hq, dk, device="cuda", dtype=torch.bfloat16)
    return q, k, v, tables, lens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--context", type=int, default=320)
    p.add_argument("--launch-len", type=int, default=None,
                   help="the launch's bound on the contexts (default --context); a decode graph's is its context "
                        "bucket, a power of two of blocks (512 for contexts of 257-512 tokens)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--grids", type=lambda t: [int(x) for x in t.split(",") if x], default=list(range(len(CHOICES))),
                   help="which launch grids of CHOICES to time (the default launch always is)")
    p.add_argument("--settled", action="store_true",
                   help="launch as a decode step does (settled=True: the first tile read before the PDL wait)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    bound = args.launch_len or args.context
    if bound < args.context:
        p.error(f"--launch-len {bound} is shorter than --context {args.context}")
    bandwidth, _ = device_ceilings()
    print(f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e9:.0f} GB/s, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, context {args.context}, "
          f"launched for {bound}"
          f"{', settled' if args.settled else ''}", flush=True)
    print("| model | batch | limit us | default us | best us | best launch | default / best |")
    print("|---|---:|---:|---:|---:|---|---:|")
    results = []
    for name in args.models.split(","):
        hq, hk, dk, dv = MODELS[name]
        for b in (int(x) for x in args.batches.split(",")):
            one = _problem(b, args.context, hq, hk, dk, dv, bound)
            row_bytes = hk * (dk + (0 if dv < dk else dv)) * 2
            copies = max(2, -(-(256 << 20) // max(1, b * args.context * row_bytes)))
            problems = [one] + [_problem(b, args.context, hq, hk, dk, dv, bound) for _ in range(copies - 1)]
            scale = dk ** -0.5
            want = da.paged_decode_attention(*one, scale, bound)
            timed = {}
            default = da.default_launch(dk, dv, b * hk * -(-(hq // hk) // 32))  # as paged_decode_attention's
            for launch in launches(args.grids, default):
                try:
                    got = da.paged_decode_attention(*one, scale, bound, launch=launch, settled=args.settled)
                    if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
                        raise AssertionError("differs from the default launch")
                    timed[launch] = graph_ms([lambda pr=pr, la=launch: da.paged_decode_attention(
                        *pr, scale, bound, launch=la, settled=args.settled) for pr in problems],
                        reps=args.reps) * 1e3
                except Exception as exc:  # a launch that does not compile (shared memory) is skipped
                    print(f"  skipped {launch}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
            best = min(timed, key=timed.get)
            limit_us = b * args.context * row_bytes / bandwidth * 1e6
            results.append(dict(model=name, batch=b, context=args.context, launch_len=bound, limit_us=limit_us,
                                timed_us={str(k): v for k, v in timed.items()}, default=str(default), best=str(best)))
            fused = ", fused merge" if best.fused_merge else ""
            print(f"| {name} | {b} | {limit_us:.1f} | {timed[default]:.1f} | {timed[best]:.1f} | "
                  f"{best.block_n} rows, {best.num_warps} warps, {best.num_stages} stages, "
                  f"{best.target_programs} programs, min chunk {best.min_chunk}{fused} | "
                  f"{timed[default] / timed[best]:.2f} |", flush=True)
            for chunk, fused in sorted({(la.min_chunk, la.fused_merge) for la in timed}):  # the best of each kind
                la = min((la for la in timed if (la.min_chunk, la.fused_merge) == (chunk, fused)), key=timed.get)
                print(f"  min chunk {chunk}{', fused merge' if fused else ''}: {timed[la]:.1f} us ({la})", flush=True)
            del problems, one
    save_results(args.out_dir, "bench_decode_attention.json", bandwidth, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
