"""The fused MoE's combine step (out[t] = sum of a token's k slot rows) in several forms, on a GPU.

The combine ends every MoE call. This times its forms side by side on the same inputs, each as
CUDA-graph replays of calls over distinct buffers (`kernels.timing.graph_ms`), with PDL as the engine
launches them, and says which give the committed wrapper's sums:

- `committed`: kernels/fused_moe.combine as it stands (its own choice of the forms below);
- `masked-loop`: the committed kernel's loop over a token's k slots, each row's load masked by its
  slot's expert id (the form before commit ad0e497), at 256-1024 columns a program;
- `where-loop`: the same loop with every row loaded unmasked and a slot of an expert held elsewhere
  dropped by a select, so that no row waits for its id;
- `tile`: commit ad0e497's form, a token's k rows as one [k, columns] tile summed across threads
  (kept here for the record: 2x slower at 4096 tokens on an H100).

    python3 benchmarks/bench_combine.py --out-dir out   # tokens 16, 64, 4096; top-k 8 and 6; hidden 2048
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from moeserve.kernels import fused_moe
from moeserve.kernels.launch import interpreting
from moeserve.kernels.numerics import store_rounded
from moeserve.kernels.pdl import enter, launch_args
from moeserve.kernels.timing import gpu_benchmark_parser, graph_ms, open_gpu_benchmark, save_results


@triton.jit(do_not_specialize=["E"])
def _tile(y_ptr, ids_ptr, out_ptr, H, E, stride_y, stride_o,
          K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
    """Commit ad0e497's combine: a token's k ids, then its k rows as one [k, BLOCK_H] tile summed across threads."""
    enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, K_PAD)
    e = tl.load(ids_ptr + t * K + j, mask=j < K, other=-1)
    held = (e >= 0) & (e < E)
    rows = (t * K + j) * stride_y
    y = tl.load(y_ptr + rows[:, None] + offs[None, :], mask=held[:, None] & (offs < H)[None, :], other=0.0)
    store_rounded(out_ptr + t * stride_o + offs, tl.sum(y.to(tl.float32), axis=0), offs < H, INTERPRET)


def _loop_call(select, y, ids, out, e, block_h, warps):
    t, k = ids.shape
    h = y.shape[1]
    return lambda: fused_moe._combine_kernel[(t, triton.cdiv(h, block_h))](
        y, ids, out, h, e, y.stride(0), out.stride(0), K=k, BLOCK_H=block_h, SELECT=select, INTERPRET=interpreting(),
        num_warps=warps, **launch_args(y))


def _tile_call(y, ids, out, e, block_h):
    t, k = ids.shape
    h = y.shape[1]
    return lambda: _tile[(t, triton.cdiv(h, block_h))](
        y, ids, out, h, e, y.stride(0), out.stride(0), K=k, K_PAD=triton.next_power_of_2(k), BLOCK_H=block_h,
        INTERPRET=interpreting(), num_warps=4, **launch_args(y))


def main(argv: list[str] | None = None) -> int:
    p = gpu_benchmark_parser(__doc__, tokens="16,64,4096", buffers=8)
    p.add_argument("--topk", default="8,6")
    p.add_argument("--experts", type=int, default=128)
    args = p.parse_args(argv)
    ceilings = open_gpu_benchmark("bench_combine")
    if ceilings is None:
        return 2
    bandwidth = ceilings[0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for k in map(int, args.topk.split(",")):
        for t in map(int, args.tokens.split(",")):
            h = args.hidden
            ys = [torch.randn(t * k, h, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(args.buffers)]
            ids = [torch.randint(0, args.experts, (t, k), device="cuda", generator=gen, dtype=torch.int64)
                   for _ in range(args.buffers)]
            outs = [torch.empty(t, h, device="cuda", dtype=torch.bfloat16) for _ in range(args.buffers)]
            want = [fused_moe.combine(y, i, args.experts, torch.bfloat16) for y, i in zip(ys, ids)]
            limit_us = (t * k * h * 2 + t * h * 2) / bandwidth * 1e6
            forms = {"committed": lambda y, i, o: (lambda: o.copy_(fused_moe.combine(y, i, args.experts, o.dtype)))}
            for bh in (256, 512, 1024):
                for w in (4, 8) if bh >= 1024 else (4,):
                    forms[f"masked-loop {bh}/{w}w"] = lambda y, i, o, bh=bh, w=w: _loop_call(False, y, i, o, args.experts, bh, w)
                    forms[f"where-loop {bh}/{w}w"] = lambda y, i, o, bh=bh, w=w: _loop_call(True, y, i, o, args.experts, bh, w)
                forms[f"tile {bh}"] = lambda y, i, o, bh=bh: _tile_call(y, i, o, args.experts, bh)
            line = {"tokens": t, "topk": k, "hidden": h, "limit_us": limit_us, "us": {}, "equal": {}}
            for name, make in forms.items():
                calls = [make(y, i, o) for y, i, o in zip(ys, ids, outs)]
                for c in calls:
                    c()
                torch.cuda.synchronize()
                line["equal"][name] = all(torch.equal(o, w) for o, w in zip(outs, want))
                line["us"][name] = graph_ms(calls, reps=args.reps) * 1e3
            best = min(line["us"], key=line["us"].__getitem__)
            print(f"tokens {t} top-{k}: limit {limit_us:.1f} us; " + "; ".join(
                f"{n} {u:.1f}{'' if line['equal'][n] else ' (differs)'}" for n, u in line["us"].items())
                + f"; best {best}", flush=True)
            rows.append(line)
    if args.out_dir:
        print(f"results in {save_results(args.out_dir, 'bench_combine.json', bandwidth, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
