"""Which SDPA backend runs moeserve's padded prefill attention, and how fast (CUDA).

The padded prefill call (models/layers/padded_attention.py) has a boolean mask and, for GQA and
MLA's absorbed latent, several query heads per KV head. With the mask, SDPA's enable_gqa leaves
only the math path; laid end to end ([B, Hk, G * Lq, D]) the same attention runs on the
memory-efficient kernel. cuDNN's backend is off in the engine (it plans per shape), and off here.
Prints milliseconds per call for each backend and layout, and the warnings SDPA gives for refusals.

    python3 benchmarks/bench_sdpa_backends.py                  # Qwen3-30B-A3B's heads, 32 x 256 tokens
    python3 benchmarks/bench_sdpa_backends.py --batch 8 --q-len 512
"""

from __future__ import annotations

import argparse
import time
import warnings


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--group", type=int, default=8, help="query heads per KV head")
    p.add_argument("--q-len", type=int, default=256)
    p.add_argument("--k-len", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    torch.backends.cuda.enable_cudnn_sdp(False)
    dev, bf16 = "cuda", torch.bfloat16
    b, hk, g, lq, lk, d = args.batch, args.kv_heads, args.group, args.q_len, args.k_len, args.head_dim
    k = torch.randn(b, lk, hk, d, device=dev, dtype=bf16).transpose(1, 2)  # as the padded gather lays them
    v = torch.randn(b, lk, hk, d, device=dev, dtype=bf16).transpose(1, 2)
    mask = torch.rand(b, 1, lq, lk, device=dev) > 0.3
    folded = (torch.randn(b, hk, g * lq, d, device=dev, dtype=bf16), mask.repeat(1, 1, g, 1), {})
    flagged = (torch.randn(b, hk * g, lq, d, device=dev, dtype=bf16), mask, {"enable_gqa": True})

    def timed(q, m, kw) -> float:
        F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.reps):
            F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.reps * 1e3

    print(f"{torch.cuda.get_device_name()}: {b} x {lq} queries over {lk} keys, {hk} KV heads x {g}, dim {d}")
    for layout, case in (("heads end to end", folded), ("enable_gqa", flagged)):
        for name, backends in (("memory-efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("math", [SDPBackend.MATH]),
                               ("SDPA's choice without cuDNN", None)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    if backends is None:
                        ms = timed(*case)
                    else:
                        with sdpa_kernel(backends):
                            ms = timed(*case)
                    result = f"{ms:.3f} ms"
                except RuntimeError as exc:
                    result = f"refused ({exc}): " + "; ".join(str(w.message)[:120] for w in caught
                                                             if "not used because" not in str(w.message))[:300]
            print(f"  {layout:17s} {name:28s} {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
