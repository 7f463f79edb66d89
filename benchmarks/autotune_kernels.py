"""Autotune the fused expert GEMMs on this GPU and write kernels/configs/<gpu>.json (read by get_config).

For each expert shape, weight format and token bucket it times every candidate of
kernels/search_space.py: the gate/up GEMM and the down GEMM separately for each BLOCK_M (and the
per-slot decode path and the expert GEMVs at few tokens), then the whole call with the best of each,
keeping the fastest.
Candidates are compiled first by worker processes into Triton's on-disk cache, so the timing loop
only loads them. Cases run in priority order and the table is saved after each, so a run stopped by
--budget-s still leaves every finished case in the file.

    python benchmarks/autotune_kernels.py --budget-s 300
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

from moeserve.kernels import fused_moe, moe_gemv
from moeserve.kernels.configs import CONFIG_DIR, GemvConfig, MoeConfig, device_file_name, shape_key
from moeserve.kernels.problems import random_batch, random_experts, rotation
from moeserve.kernels.roofline import SHAPES, ExpertShape
from moeserve.kernels.search_space import (block_m_choices, gemm_choices, gemv_down_choices, gemv_up_choices,
                                           per_slot_choices, prequant_choices)
from moeserve.kernels.timing import graph_ms, runoff

TOKENS = (1, 8, 64, 256, 1024, 4096)


def cases(shapes: list[str], tokens: list[int], quants: list[str]) -> list[tuple[str, str, int]]:
    """(shape, quant, tokens) in priority order: bf16 up to 64 tokens, bf16 beyond on the two shapes
    with a limit target, FP8 up to 64 tokens, then the rest; by shape within each group, so that
    each group loads a shape's weights once."""
    def rank(case):
        name, quant, t = case
        targeted = name in ("qwen3-30b-a3b", "deepseek-v2-lite")
        group = 0 if quant == "bf16" and t <= 64 else 1 if quant == "bf16" and targeted else 2 if t <= 64 else 3
        return (group, name, quant, t)
    return sorted(((s, q, t) for s in shapes for q in quants for t in tokens), key=rank)


def layouts(shape: ExpertShape, quant: str, t: int) -> list[MoeConfig]:
    """The (block_m, per_slot, prequant) combinations tried for one case, as GEMM-less MoeConfigs."""
    return [MoeConfig(bm, per_slot=per_slot, prequant=pq)
            for per_slot in per_slot_choices(t)
            for bm in ([16] if per_slot else block_m_choices(t, shape.experts, shape.top_k))
            for pq in prequant_choices(quant)]


def gemv_options(shape: ExpertShape, quant: str, t: int) -> tuple[list[GemvConfig], list[GemvConfig]]:
    """The expert GEMVs' candidates for one case: gate/up ones, and down ones (with the gate/up defaults);
    FP8 with its activations quantised in the GEMV's programs and by a launch of their own."""
    pqs = prequant_choices(quant)
    up = [GemvConfig(up_rows=rows, up_warps=warps, up_prequant=pq)
          for rows, warps in gemv_up_choices(t, shape.hidden, quant) for pq in pqs]
    down = [GemvConfig(down_rows=rows, down_warps=warps, combine=combine, down_prequant=pq, down_pieces=pieces)
            for rows, warps, combine, pieces in gemv_down_choices(t, shape.inter, shape.top_k, quant) for pq in pqs]
    return up, down


def options(shape: ExpertShape, quant: str, t: int) -> list[tuple[MoeConfig, str, object]]:
    """Every (layout, gemm, config) the tuner will time for one case; the GEMVs' as gemm 'gemv_up' / 'gemv_down'."""
    up, down = gemv_options(shape, quant, t)
    return ([(lay, gemm, c) for lay in layouts(shape, quant, t) for gemm in ("up", "down")
             for c in gemm_choices(lay.block_m, quant, gemm == "up")]
            + [(MoeConfig(), "gemv_up", c) for c in up] + [(MoeConfig(), "gemv_down", c) for c in down])


# ---- compile phase (worker processes) --------------------------------------------------------

_WORKER_PROBLEMS: dict = {}


def _compile_one(task) -> str | None:
    """Launch one candidate on a one-token problem of the real H and I, so that Triton compiles
    exactly the specialisation the timing loop will use and caches it on disk: one expert for the
    GEMMs; for the GEMVs, whose down kernel specialises on top_k, top_k experts and slots."""
    name, quant, lay, gemm, cfg = task
    gemv = gemm.startswith("gemv")
    key = (name, quant, gemv)
    if key not in _WORKER_PROBLEMS:
        s = SHAPES[name]
        k = s.top_k if gemv else 1
        small = ExpertShape(s.name, s.hidden, s.inter, k, k)
        gen = torch.Generator(device="cuda").manual_seed(0)
        _WORKER_PROBLEMS[key] = (random_experts(small, quant, gen), random_batch(small, 1, gen))
    weights, batch = _WORKER_PROBLEMS[key]
    try:
        if gemv:
            act = moe_gemv.gate_up(batch.hidden, weights, batch.ids.view(-1), batch.ids.shape[1], cfg)
            if gemm == "gemv_down":
                fused_moe.gemv_down(act, weights, batch.ids, batch.weights, cfg)
            torch.cuda.synchronize()
            return None
        plan = fused_moe.plan_slots(batch.ids, 1, lay)
        act = fused_moe.gate_up(batch.hidden, weights, plan, cfg, lay.prequant)
        if gemm == "down":
            fused_moe.down(act, weights, plan, batch.weights, cfg, lay.prequant)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # out of shared memory or registers: the timing loop skips it too
        return f"{task}: {type(exc).__name__}"


def _signature(name: str, quant: str, lay: MoeConfig, gemm: str, cfg) -> tuple:
    """What Triton specialises on besides the config: K's divisibility by BLOCK_K, and for FP8 the
    scale strides' divisibility by 16 (shape dependent)."""
    s = SHAPES[name]
    if gemm.startswith("gemv"):
        return (quant, gemm, cfg, s.hidden, s.inter)
    k = s.hidden if gemm == "up" else s.inter
    scale = ()
    if quant == "fp8":
        scale = ((s.hidden + 127) // 128 % 16, (s.inter + 127) // 128 % 16)
    return (quant, lay, gemm, cfg, k % (128 if quant == "fp8" else cfg.block_k) == 0, scale)


def precompile(todo: list[tuple[str, str, int]], workers: int, gemv_only: bool = False) -> None:
    tasks, seen = [], set()
    for name, quant, t in todo:
        for lay, gemm, cfg in options(SHAPES[name], quant, t):
            if gemv_only and not gemm.startswith("gemv"):
                continue
            sig = _signature(name, quant, lay, gemm, cfg)
            if sig not in seen:
                seen.add(sig)
                tasks.append((name, quant, lay, gemm, cfg))
    start = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        failed = [r for r in pool.imap_unordered(_compile_one, tasks, chunksize=2) if r]
    print(f"compiled {len(tasks)} kernels with {workers} workers in {time.time() - start:.0f}s; "
          f"{len(failed)} could not run", flush=True)


# ---- timing phase ----------------------------------------------------------------------------

def _best(label: str, candidates, time_one, seen: dict | None = None) -> tuple[object, float]:
    """The fastest candidate and its time; seen, when given, gets every candidate's time by its repr."""
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = time_one(cfg)
        except Exception:  # a candidate that cannot launch here (resources) is simply not chosen
            torch.cuda.synchronize()
            continue
        if seen is not None:
            seen[repr(cfg)] = round(ms, 4)
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no candidate of {label} could run")
    return best, best_ms


def tune_case(shape: ExpertShape, quant: str, t: int, weights, reps: int,
              gemv_only: bool = False) -> tuple[MoeConfig, float, dict]:
    """The fastest MoeConfig for one case, its time per call (ms) and what each option scored. The
    configuration calls take now (the table's entry, or the default) is one of the options, so a
    retune never keeps something slower. The best other option and the current one are then timed
    again side by side (timing.runoff), since the current one was timed first, minutes earlier, and
    close calls go either way on one timing each. gemv_only times the expert GEMVs against it alone."""
    gen = torch.Generator(device="cuda").manual_seed(1000 + t)
    batches = [random_batch(shape, t, gen) for _ in range(rotation(t))]
    scores = {}
    # About 30 ms of replays per candidate: many for decode, a few for 4096-token prefill.
    probe = graph_ms([functools.partial(fused_moe.fused_experts, b.hidden, weights, b.ids, b.weights)
                      for b in batches], reps=2)
    reps = max(3, min(reps, round(30 / (probe * len(batches)))))

    def whole_call(cfg):
        return lambda: graph_ms([functools.partial(fused_moe.fused_experts, b.hidden, weights, b.ids, b.weights, cfg)
                                 for b in batches], reps=reps)

    current = fused_moe.select_config(batches[0].hidden, weights, shape.top_k)
    current_ms = whole_call(current)()
    scores["current"] = round(current_ms, 4)
    best, best_ms = None, float("inf")  # the fastest option other than the current one
    for lay in [] if gemv_only else layouts(shape, quant, t):
        plans = [fused_moe.plan_slots(b.ids, shape.experts, lay) for b in batches]

        def time_up(cfg):
            return graph_ms([functools.partial(fused_moe.gate_up, b.hidden, weights, p, cfg, lay.prequant)
                             for b, p in zip(batches, plans)], reps=reps)

        up, _ = _best("gate/up", gemm_choices(lay.block_m, quant, True), time_up)
        acts = [fused_moe.gate_up(b.hidden, weights, p, up, lay.prequant) for b, p in zip(batches, plans)]

        def time_down(cfg):
            return graph_ms([functools.partial(fused_moe.down, a, weights, p, b.weights, cfg, lay.prequant)
                             for a, b, p in zip(acts, batches, plans)], reps=reps)

        dn, _ = _best("down", gemm_choices(lay.block_m, quant, False), time_down)
        config = MoeConfig(lay.block_m, up, dn, lay.per_slot, lay.prequant)
        ms = whole_call(config)()
        label = f"block_m={lay.block_m}" + (",per_slot" if lay.per_slot else "") + (",prequant" if lay.prequant else "")
        scores[label] = round(ms, 4)
        if ms < best_ms:
            best, best_ms = config, ms
    gemv = tune_gemv(shape, quant, t, weights, batches, reps, scores, whole_call)
    if gemv is not None and gemv[1] < best_ms:
        best, best_ms = gemv
    if best is None or best == current:
        return current, current_ms, scores
    winner, medians = runoff({"current": whole_call(current), "new": whole_call(best)})
    scores["runoff"] = {name: round(ms, 4) for name, ms in medians.items()}
    return (current if winner == "current" else best), medians[winner], scores


def tune_gemv(shape: ExpertShape, quant: str, t: int, weights, batches, reps: int, scores: dict,
              whole_call) -> tuple[MoeConfig, float] | None:
    """The fastest expert-GEMV configuration for one case and its time per call (whole_call(cfg)()),
    or None where the GEMVs are not tried (too many tokens, or reductions too long for registers).
    Each candidate's time goes into scores['gemv_up'] and scores['gemv_down'] (the down ones with
    their combine)."""
    up_choices, down_choices = gemv_options(shape, quant, t)
    if not up_choices or not down_choices or not moe_gemv.supports(weights):
        return None
    k = shape.top_k

    def time_up(cfg):
        return graph_ms([functools.partial(moe_gemv.gate_up, b.hidden, weights, b.ids.view(-1), k, cfg)
                         for b in batches], reps=reps)

    up, _ = _best("gemv gate/up", up_choices, time_up, scores.setdefault("gemv_up", {}))
    acts = [moe_gemv.gate_up(b.hidden, weights, b.ids.view(-1), k, up) for b in batches]

    def time_down(cfg):
        return graph_ms([functools.partial(fused_moe.gemv_down, a, weights, b.ids, b.weights, cfg)
                         for a, b in zip(acts, batches)], reps=reps)

    down, _ = _best("gemv down", down_choices, time_down, scores.setdefault("gemv_down", {}))
    config = MoeConfig(gemv=dataclasses.replace(down, up_rows=up.up_rows, up_warps=up.up_warps,
                                                up_prequant=up.up_prequant))
    ms = whole_call(config)()
    scores["gemv"] = round(ms, 4)
    return config, ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--quants", default="bf16,fp8")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this long")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--gemv-only", action="store_true",
                    help="time only the expert GEMVs, against the configuration calls take now")
    ap.add_argument("--out", type=Path, help="table file (default kernels/configs/<gpu>.json)")
    ap.add_argument("--log", type=Path, help="JSON log of every case's scores")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.time()
    gpu = torch.cuda.get_device_name()
    out = args.out or CONFIG_DIR / device_file_name(gpu)
    table = json.loads(out.read_text()) if out.exists() else {}
    todo = cases(args.shapes.split(","), [int(t) for t in args.tokens.split(",")], args.quants.split(","))
    precompile(todo, args.workers, args.gemv_only)
    log, loaded = [], {}
    torch.set_grad_enabled(False)
    for name, quant, t in todo:
        if time.time() - start > args.budget_s:
            print(f"budget spent: stopping before {name} {quant} T={t}", flush=True)
            break
        shape = SHAPES[name]
        if (name, quant) not in loaded:
            loaded.clear()  # one shape's weights on the GPU at a time
            torch.cuda.empty_cache()
            loaded[(name, quant)] = random_experts(shape, quant, torch.Generator(device="cuda").manual_seed(0))
        config, ms, scores = tune_case(shape, quant, t, loaded[(name, quant)], args.reps, args.gemv_only)
        key = shape_key(shape.experts, shape.hidden, shape.inter, shape.top_k, quant)
        table.setdefault(key, {})[str(t)] = config.to_dict()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        log.append({"shape": name, "quant": quant, "tokens": t, "ms": ms, "scores": scores, "config": config.to_dict()})
        if args.log:
            args.log.write_text(json.dumps({"gpu": gpu, "cases": log}, indent=1))
        brief = {k: v for k, v in scores.items() if not isinstance(v, dict) or k == "runoff"}
        print(f"{name:18s} {quant:5s} T={t:5d} {ms * 1e3:9.1f} us  {brief}  [{time.time() - start:.0f}s]", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
