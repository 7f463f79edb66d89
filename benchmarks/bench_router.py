"""The MoE router's logits at prompt sizes on a GPU: the float32 path (a cast of the bf16 activations
and a float32 GEMM, reference.router_logits) against gating.router_logits_gemm (each float32 weight
as three bf16 parts on tensor cores), same inputs, CUDA-graph replays over distinct activations
(`kernels.timing.graph_ms`), with the largest difference between the two and the bandwidth limit of
the bytes read and written.

    python3 benchmarks/bench_router.py --out-dir out   # tokens 256..8192; 128 and 64 experts; hidden 2048
"""

from __future__ import annotations

import argparse
import sys

import torch

from moeserve.kernels import gating, reference
from moeserve.kernels.timing import device_ceilings, graph_ms, save_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="256,1024,4096,8192")
    p.add_argument("--experts", default="128,64")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--buffers", type=int, default=4)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_router needs a CUDA device", file=sys.stderr)
        return 2
    bandwidth, peak = device_ceilings()
    print(f"device {torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
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
    if args.out_dir:
        print(f"results in {save_results(args.out_dir, 'bench_router.json', bandwidth, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
