"""How fast the one-token expert gate/up GEMV's access pattern can stream weights at all, apart from
its arithmetic: the speed of light for kernels/moe_gemv.py's gate/up launch.

A one-token FP8 call of Qwen3-30B-A3B's experts streams its 25 MB of gate/up weights at 2.5 TB/s
where the bf16 GEMV streams 50 MB at 3.7 TB/s (docs/benchmarks.md). This script times, on the same
grid as the real GEMV (slot, block of ROWS gate rows and the matching up rows), kernels that do less:

- `stream`: load the program's weight rows as raw integers and sum them as integers (no
  conversion, no activations): the access pattern alone.
- `widen`: the same rows converted to float32 and summed (the weights' conversion, no activations).
- `dot`: float32 weights times the token's row (bf16, read after the wait) and reduced, the bf16
  GEMV's arithmetic on the FP8 bytes (no activation quantisation).
- `real`: moe_gemv.gate_up itself at the same ROWS and warps.

Each at every (ROWS, warps), for bf16 and FP8 weights, and `stream` and `dot` also with the weights
loaded evict-first (`-ef`). Times are CUDA-graph replays over 8 routings drawn afresh, as
kernels/timing.py times every call, with the copy bandwidth measured in the same run.

    python3 benchmarks/gemv_stream.py --out-dir $OUT
    TRITON_INTERPRET=1 python benchmarks/gemv_stream.py --smoke     # CPU: every kernel against torch
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os

import torch
import triton
import triton.language as tl

from moeserve.kernels import moe_gemv
from moeserve.kernels.configs import GemvConfig
from moeserve.kernels.launch import interpreting
from moeserve.kernels.pdl import enter, launch_args
from moeserve.kernels.problems import random_batch, random_experts, rotation
from moeserve.kernels.roofline import SHAPES

MODES = {"stream": 0, "widen": 1, "dot": 2}
ROWS = (1, 2, 4, 8)
WARPS = (2, 4, 8)


@triton.jit
def _up_like_kernel(w_ptr, ids_ptr, x_ptr, out_ptr, I, K, stride_we, stride_wn,
                    MODE: tl.constexpr, EVICT_FIRST: tl.constexpr, ROWS: tl.constexpr, KP: tl.constexpr,
                    PDL: tl.constexpr):
    """moe_gemv._gemv_up_kernel's loads on its grid, with MODE's arithmetic: out[slot, n] from the
    gate row n and the up row n + I of the slot's expert."""
    slot = tl.program_id(0)
    n = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    k = tl.arange(0, KP)
    mask = (n < I)[:, None] & (k < K)[None, :]
    enter(PDL)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    rows = w_ptr + e * stride_we + k[None, :]
    policy: tl.constexpr = "evict_first" if EVICT_FIRST else ""
    zero: tl.constexpr = 0 if MODE == 0 else 0.0  # integers for `stream`
    wg = tl.load(rows + n[:, None].to(tl.int64) * stride_wn, mask=mask, other=zero, eviction_policy=policy)
    wu = tl.load(rows + (n + I)[:, None].to(tl.int64) * stride_wn, mask=mask, other=zero, eviction_policy=policy)
    if MODE == 0:
        y = (tl.sum(wg.to(tl.int32), axis=1) + tl.sum(wu.to(tl.int32), axis=1)).to(tl.float32)
    elif MODE == 1:
        y = tl.sum(wg.to(tl.float32), axis=1) + tl.sum(wu.to(tl.float32), axis=1)
    else:
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
        g = tl.sum(wg.to(tl.float32) * x, axis=1)
        u = tl.sum(wu.to(tl.float32) * x, axis=1)
        y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + slot.to(tl.int64) * I + n, y, mask=n < I)


def up_like(w13: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, mode: str, rows: int, warps: int,
            evict_first: bool = False) -> torch.Tensor:
    """out [S, I] float32 for flat ids [S] and the token row x [H]; `stream` reads the weights' bytes as
    integers (int8 for FP8, int16 for bf16)."""
    e, two_i, k = w13.shape
    inter = two_i // 2
    w = w13.view(torch.int8 if w13.element_size() == 1 else torch.int16) if mode == "stream" else w13
    out = torch.empty(ids.numel(), inter, dtype=torch.float32, device=w13.device)
    _up_like_kernel[(ids.numel(), triton.cdiv(inter, rows))](
        w, ids, x, out, inter, k, w.stride(0), w.stride(1), MODE=MODES[mode], EVICT_FIRST=evict_first,
        ROWS=rows, KP=triton.next_power_of_2(k), num_warps=warps, **launch_args(x))
    return out


def _expected(w13: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor:
    inter = w13.shape[1] // 2
    w = w13[ids]
    if mode == "stream":
        raw = w.view(torch.int8 if w13.element_size() == 1 else torch.int16).to(torch.int64)
        return (raw[:, :inter].sum(-1) + raw[:, inter:].sum(-1)).float()
    wf = w.float()
    if mode == "widen":
        return wf[:, :inter].sum(-1) + wf[:, inter:].sum(-1)
    g = wf[:, :inter] @ x.float()
    u = wf[:, inter:] @ x.float()
    return torch.nn.functional.silu(g) * u


def smoke() -> int:
    """Every kernel variant against torch at a tiny shape (CPU interpreter or a GPU)."""
    device = "cpu" if interpreting() else "cuda"
    gen = torch.Generator(device="cpu").manual_seed(0)
    w13 = torch.randn(4, 2 * 48, 256, generator=gen).to(torch.bfloat16)
    variants = {"bf16": w13, "fp8": w13.to(torch.float8_e4m3fn)}
    ids = torch.tensor([3, 0, 2], device=device)
    x = torch.randn(256, generator=gen).to(torch.bfloat16).to(device)
    for (quant, w), mode, rows in itertools.product(variants.items(), MODES, (1, 4)):
        w = w.to(device)
        got = up_like(w, ids, x, mode, rows, 2, evict_first=mode == "dot")
        torch.testing.assert_close(got.cpu(), _expected(w, ids, x, mode).cpu(), rtol=1e-4, atol=1e-2)
    print("gemv_stream smoke: every variant matches torch")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="check every variant against torch at a tiny shape")
    args = p.parse_args()
    if args.smoke:
        return smoke()
    from moeserve.kernels.timing import device_ceilings, graph_ms, save_results

    bandwidth, _ = device_ceilings()
    print(f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e12:.2f} TB/s, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        batches = [random_batch(shape, 1, gen) for _ in range(rotation(1))]
        for quant in ("bf16", "fp8"):
            weights = random_experts(shape, quant, gen)
            nbytes = shape.top_k * weights.w13[0].numel() * weights.w13.element_size()
            print(f"\n{name} {quant}: gate/up weights {nbytes / 1e6:.1f} MB a call (limit "
                  f"{nbytes / bandwidth * 1e6:.1f} us at the copy bandwidth); us (TB/s)", flush=True)
            print("| rows, warps | stream | stream-ef | widen | dot | dot-ef | real |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for rows, warps in itertools.product(ROWS, WARPS):
                row = {}
                for label, mode, ef in (("stream", "stream", False), ("stream-ef", "stream", True),
                                        ("widen", "widen", False), ("dot", "dot", False), ("dot-ef", "dot", True)):
                    calls = [lambda b=b, m=mode, f=ef: up_like(weights.w13, b.ids.view(-1), b.hidden[0], m, rows, warps, f)
                             for b in batches]
                    row[label] = graph_ms(calls, reps=args.reps) * 1e3
                cfg = GemvConfig(up_rows=rows, up_warps=warps)
                calls = [lambda b=b: moe_gemv.gate_up(b.hidden, weights, b.ids.view(-1), shape.top_k, cfg)
                         for b in batches]
                row["real"] = graph_ms(calls, reps=args.reps) * 1e3
                results.append(dict(shape=name, quant=quant, rows=rows, warps=warps, bytes=nbytes, us=row))
                cells = " | ".join(f"{us:.1f} ({nbytes / us / 1e6:.2f})" for us in row.values())
                print(f"| {rows}, {warps} | {cells} |", flush=True)
            del weights
    save_results(args.out_dir, "gemv_stream.json", bandwidth, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
