"""Benchmark the fused expert MLP against the physical limit and HF transformers' grouped_mm experts.

For each expert shape and token count: our bf16 and FP8 kernels (the configuration table in
kernels/configs/), and transformers' "grouped_mm" experts implementation run on the same bf16
weights, all timed the same way (kernels/timing.py: CUDA-graph replays over rotated routings). The
limit is max(bytes / bandwidth, FLOPs / bf16 peak) with both ceilings measured in this run.

    python benchmarks/bench_kernels.py --out /tmp/bench   # prints a markdown table, writes JSON
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

from moeserve.kernels import fused_moe, moe_gemv
from moeserve.kernels.problems import random_batch, random_experts, rotation
from moeserve.kernels.roofline import SHAPES, ExpertShape, flops, limit_ms, min_bytes
from moeserve.kernels.timing import device_ceilings, eager_ms, graph_ms
from moeserve.kernels.weights import ExpertWeights, quantize_experts

TOKENS = (1, 8, 64, 256, 1024, 4096)
LIMIT_SHAPES = ("qwen3-30b-a3b", "deepseek-v2-lite")  # the shapes with a share-of-limit target


def hf_grouped_mm_experts(shape: ExpertShape, weights: ExpertWeights) -> torch.nn.Module:
    """transformers' MoE experts module with experts_implementation="grouped_mm", holding our bf16
    tensors (same [E, 2I, H] / [E, H, I] layout, so no copy). Qwen3-MoE's module serves every shape:
    the grouped_mm forward is shared by all of transformers' MoE experts modules."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.inter, num_experts=shape.experts,
                         num_experts_per_tok=shape.top_k, hidden_act="silu")
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        module = Qwen3MoeExperts(cfg)
    module.gate_up_proj = torch.nn.Parameter(weights.w13, requires_grad=False)
    module.down_proj = torch.nn.Parameter(weights.w2, requires_grad=False)
    return module


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def timed(calls, reps: int) -> tuple[float, str]:
    """Graph-replay time, or eager time where the calls cannot be captured."""
    try:
        return graph_ms(calls, reps=reps), "graph"
    except Exception as exc:  # noqa: BLE001 - report and fall back; the method is recorded
        print(f"  graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return eager_ms(calls, reps=reps), "eager"


def parts_ms(shape: ExpertShape, weights: ExpertWeights, batches, reps: int) -> dict:
    """Each step of the call alone, at the configuration the call uses: where the time goes."""
    cfg = fused_moe.select_config(batches[0].hidden, weights, shape.top_k)
    if fused_moe.uses_gemv(cfg, weights):
        k, g = shape.top_k, cfg.gemv
        acts = [moe_gemv.gate_up(b.hidden, weights, b.ids.view(-1), k, g) for b in batches]
        steps = {"gemv_gate_up": [functools.partial(moe_gemv.gate_up, b.hidden, weights, b.ids.view(-1), k, g)
                                  for b in batches],
                 "gemv_down" + ("_combine" if g.combine else ""): [
                     functools.partial(moe_gemv.down, a, weights, b.ids.view(-1), b.weights.view(-1), k, g)
                     for a, b in zip(acts, batches)]}
        if not g.combine:
            ys = [moe_gemv.down(a, weights, b.ids.view(-1), b.weights.view(-1), k, g) for a, b in zip(acts, batches)]
            steps["combine"] = [functools.partial(fused_moe.combine, y, b.ids, shape.experts, torch.bfloat16)
                                for y, b in zip(ys, batches)]
        return {name: graph_ms(calls, reps=reps) for name, calls in steps.items()}
    plans = [fused_moe.plan_slots(b.ids, shape.experts, cfg) for b in batches]
    pq = cfg.prequant
    acts = [fused_moe.gate_up(b.hidden, weights, p, cfg.up, pq) for b, p in zip(batches, plans)]
    ys = [fused_moe.down(a, weights, p, b.weights, cfg.down, pq) for a, b, p in zip(acts, batches, plans)]
    steps = {
        "gate_up": [functools.partial(fused_moe.gate_up, b.hidden, weights, p, cfg.up, pq)
                    for b, p in zip(batches, plans)],
        "down": [functools.partial(fused_moe.down, a, weights, p, b.weights, cfg.down, pq)
                 for a, b, p in zip(acts, batches, plans)],
        "combine": [functools.partial(fused_moe.combine, y, b.ids, shape.experts, torch.bfloat16)
                    for y, b in zip(ys, batches)],
    }
    if not cfg.per_slot:
        steps["permute"] = [functools.partial(fused_moe.plan_slots, b.ids, shape.experts, cfg) for b in batches]
    return {name: graph_ms(calls, reps=reps) for name, calls in steps.items()}


def bench_case(shape: ExpertShape, t: int, bf16: ExpertWeights, fp8: ExpertWeights, hf, ceilings, reps: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(t)
    batches = [random_batch(shape, t, gen) for _ in range(rotation(t))]
    hit = statistics.mean(b.experts_hit(shape.experts) for b in batches)
    held = t * shape.top_k
    row: dict = {"shape": shape.name, "tokens": t, "experts_hit": hit}
    for quant, weights in (("bf16", bf16), ("fp8", fp8)):
        calls = [functools.partial(fused_moe.fused_experts, b.hidden, weights, b.ids, b.weights) for b in batches]
        ms, how = timed(calls, reps)
        lim = limit_ms(min_bytes(shape, t, hit, quant), flops(shape, held), *ceilings)
        row[quant] = {"ms": ms, "timing": how, "limit_ms": lim, "share_of_limit": lim / ms,
                      "eager_ms": eager_ms(calls, reps=reps), "parts_ms": parts_ms(shape, weights, batches, reps),
                      "config": fused_moe.select_config(batches[0].hidden, weights, shape.top_k).to_dict()}
    hf_calls = [functools.partial(hf, b.hidden, b.ids, b.weights.to(torch.bfloat16)) for b in batches]
    ms, how = timed(hf_calls, reps)
    row["hf_grouped_mm"] = {"ms": ms, "timing": how, "eager_ms": eager_ms(hf_calls, reps=reps)}
    b = batches[0]
    ours = fused_moe.fused_experts(b.hidden, bf16, b.ids, b.weights)
    row["rel_err_bf16_vs_hf"] = rel_err(ours, hf(b.hidden, b.ids, b.weights.to(torch.bfloat16)))
    row["rel_err_fp8_vs_bf16"] = rel_err(fused_moe.fused_experts(b.hidden, fp8, b.ids, b.weights), ours)
    row["x_hf"] = ms / row["bf16"]["ms"]
    row["fp8_x_bf16"] = row["bf16"]["ms"] / row["fp8"]["ms"]
    return row


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's Done-when targets, each with the cases that miss it."""
    def check(label, cases, ok):
        miss = [f"{r['shape']}@{r['tokens']}" for r in cases if not ok(r)]
        return f"{'MET ' if not miss else 'MISS'} {label}" + (f" (misses: {', '.join(miss)})" if miss else "")
    small = [r for r in rows if r["tokens"] <= 64]
    big = [r for r in rows if r["tokens"] >= 64 and r["shape"] in LIMIT_SHAPES]
    return [
        check("bf16 >= 1.5x HF grouped_mm at <= 64 tokens", small, lambda r: r["x_hf"] >= 1.5),
        check("bf16 >= 75% of limit at >= 64 tokens (qwen3, v2-lite)", big,
              lambda r: r["bf16"]["share_of_limit"] >= 0.75),
        check("fp8 >= 1.6x bf16 at <= 64 tokens", small, lambda r: r["fp8_x_bf16"] >= 1.6),
    ]


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | tokens | bf16 ms | bf16 % limit | HF grouped_mm ms | x HF | fp8 ms | fp8 % limit | fp8 x bf16 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['bf16']['ms']:.4f} | {100 * r['bf16']['share_of_limit']:.0f}% "
                     f"| {r['hf_grouped_mm']['ms']:.4f} | {r['x_hf']:.2f} | {r['fp8']['ms']:.4f} "
                     f"| {100 * r['fp8']['share_of_limit']:.0f}% | {r['fp8_x_bf16']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, help="folder for bench_kernels.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    import transformers

    bandwidth, peak = device_ceilings()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s; "
          f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        bf16 = random_experts(shape, "bf16", torch.Generator(device="cuda").manual_seed(0))
        fp8 = quantize_experts(bf16, "fp8")
        hf = hf_grouped_mm_experts(shape, bf16)
        for t in (int(x) for x in args.tokens.split(",")):
            row = bench_case(shape, t, bf16, fp8, hf, (bandwidth, peak), args.reps)
            rows.append(row)
            if args.out:  # after every row, so a run cut short keeps what it measured
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "bench_kernels.json").write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1))
            print(f"{name:18s} T={t:5d} bf16 {row['bf16']['ms'] * 1e3:9.1f} us "
                  f"({100 * row['bf16']['share_of_limit']:3.0f}%) HF {row['hf_grouped_mm']['ms'] * 1e3:9.1f} us "
                  f"x{row['x_hf']:.2f} fp8 {row['fp8']['ms'] * 1e3:9.1f} us x{row['fp8_x_bf16']:.2f} "
                  f"err {row['rel_err_bf16_vs_hf']:.1e}/{row['rel_err_fp8_vs_bf16']:.1e}", flush=True)
            for quant in ("bf16", "fp8"):
                print(f"    {quant} parts (us): " + ", ".join(
                    f"{k} {v * 1e3:.1f}" for k, v in row[quant]["parts_ms"].items()), flush=True)
        del bf16, fp8, hf
        torch.cuda.empty_cache()
    report = {"gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "bandwidth_Bps": bandwidth, "bf16_peak_flops": peak, "torch": torch.__version__,
              "transformers": transformers.__version__, "rows": rows, "verdicts": verdicts(rows)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_kernels.json").write_text(json.dumps(report, indent=1))
    print()
    print(markdown(rows))
    print()
    print("\n".join(report["verdicts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
