"""The MoE router's logits at prompt sizes on a GPU: the float32 path (a cast of the bf16 activations
and a float32 GEMM, reference.router_logits) against gating.router_logits_gemm (each float32 weight
as three bf16 parts on tensor cores), same inputs, CUDA-graph replays over distinct activations
(`kernels.timing.graph_ms`), with the largest difference between the two and the bandwidth limit of
the bytes read and written. Then the softmax top-k after it (gating.softmax_topk) at the same token
counts, every launch of TOPK_LAUNCHES (tokens per program, warps) against the default's.

    python3 benchmarks/bench_router.py --out-dir out   # tokens 256..8192; 128 and 64 experts; hidden 2048
"""

from __future__ import annotations

import torch
import triton

from moeserve.kernels import gating, reference
from moeserve.kernels.timing import gpu_benchmark_parser, graph_ms, open_gpu_benchmark, save_results

TOPK_LAUNCHES = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4), (16, 4), (32, 8)]
TOP_K = {128: 8, 64: 6}  # the benchmark models' top-k by expert count (Qwen3-30B-A3B, DeepSeek-V2-Lite)


def main(argv: list[str] | None = None) -> int:
    p = gpu_benchmark_parser(__doc__, tokens="256,1024,4096,8192", buffers=4)
    p.add_argument("--experts", default="128,64")
    args = p.parse_args(argv)
    ceilings = open_gpu_benchmark("bench_router")
    if ceilings is None:
        return 2
    bandwidth, peak = ceilings
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for e in map(int, args.experts.split(",")):
        w = torch.randn(e, args.hidden, device="cuda", generator=gen) * 0.02
        for t in map(int, args.tokens.split(",")):
            xs = [torch.randn(t, args.hidden, device="cuda", generator=gen).bfloat16() for _ in range(args.buffers)]
            diff = max((gating.router_logits_gemm(x, w) - reference.router_logits(x, w)).abs().max().item() for x in xs)
            scale = max(reference.router_logits(x, w).abs().max().item() for x in xs)
            ref_us = graph_ms([lambda x=x: reference.router_logits(x, w) for x in xs], reps=args.reps) * 1e3
            gemm_us = graph_ms([lambda x=x: gating.router_logits_gemm(x, w) for x in xs], reps=args.reps) * 1e3
            limit_us = max((t * args.hidden * 2 + e * args.hidden * 4 + t * e * 4) / bandwidth,
                           2 * t * e * args.hidden / peak) * 1e6
            rows.append({"tokens": t, "experts": e, "hidden": args.hidden, "float32_us": ref_us, "gemm_us": gemm_us,
                         "limit_us": limit_us, "max_abs_diff": diff, "max_abs_logit": scale})
            print(f"tokens {t} experts {e}: float32 path {ref_us:.1f} us, three-bf16 GEMM {gemm_us:.1f} us, limit "
                  f"{limit_us:.1f} us; largest difference {diff:.2e} (logits up to {scale:.2f})", flush=True)
    for e in map(int, args.experts.split(",")):
        k = TOP_K.get(e, 8)
        for t in map(int, args.tokens.split(",")):
            logits = [torch.randn(t, e, device="cuda", generator=gen) for _ in range(args.buffers)]
            want = [gating.softmax_topk(x, k, True) for x in logits]
            default = gating.topk_launch(t, triton.next_power_of_2(e))
            timed = {}
            for launch in sorted(set(TOPK_LAUNCHES) | {default}):
                for x, (w_ref, i_ref) in zip(logits, want):
                    got_w, got_i = gating.softmax_topk(x, k, True, launch=launch)
                    # the same experts; weights within float32 rounding (warps sum the softmax in another order)
                    if not (torch.equal(got_i, i_ref) and torch.allclose(got_w, w_ref, rtol=1e-5, atol=1e-7)):
                        raise SystemExit(f"top-k launch {launch} disagrees with the default at {t} tokens")
                timed[launch] = graph_ms([lambda x=x, la=launch: gating.softmax_topk(x, k, True, launch=la)
                                          for x in logits], reps=args.reps) * 1e3
            best = min(timed, key=timed.get)
            limit_us = t * (e * 4 + k * 12) / bandwidth * 1e6
            rows.append({"tokens": t, "experts": e, "top_k": k,
                         "topk_us": {f"{a}x{b}": v for (a, b), v in timed.items()},
                         "default": f"{default[0]}x{default[1]}", "limit_us": limit_us})
            print(f"top-{k} of {e} at {t} tokens: default {default} {timed[default]:.1f} us, best {best} "
                  f"{timed[best]:.1f} us, limit {limit_us:.1f} us", flush=True)
    if args.out_dir:
        print(f"results in {save_results(args.out_dir, 'bench_router.json', bandwidth, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
