"""How many distinct experts the serving benchmark's random-weight models route each step to, per MoE
layer, against what uniform routing would touch.

bench_serving.py's decode-step floor counts the expert weights a step reads assuming each token's
top-k experts are drawn uniformly; a random model whose tokens all prefer the same few experts would
read fewer bytes than that floor assumes (and flatter every figure measured on it). This serves
B random 256-token prompts through the engine (eager, so the gating runs in Python each step),
records the gating's expert ids, and prints per step kind (the prefill, then decodes) the mean over
layers of the distinct experts touched and the uniform expectation for the same number of tokens.

    python3 benchmarks/routing_spread.py --models qwen3-30b-a3b,deepseek-v2-lite --batches 1,64
    python3 benchmarks/routing_spread.py --smoke        # tiny model on CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving as bs  # noqa: E402  (same folder: presets, random models, import shim)


def uniform_distinct(experts: int, tokens: int, k: int) -> float:
    """Expected distinct experts when each of `tokens` tokens picks k different experts uniformly."""
    return experts * (1.0 - (1.0 - k / experts) ** tokens)


def measure(name: str, batch: int, args: argparse.Namespace) -> dict:
    import torch

    from moeserve.kernels import ops
    from moeserve.router.config import EngineConfig
    from moeserve.router.llm_engine import LLMEngine
    from moeserve.router.sequence import SamplingParams

    hf = bs.preset(name)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = bs.build_random_model(hf, args.device, dtype, args.seed)
    config = EngineConfig(device=args.device, dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                          max_num_seqs=max(batch, 1), max_num_batched_tokens=max(batch * args.prompt_len, 256),
                          max_model_len=args.prompt_len + args.decode_steps + 8, decode_graphs="off",
                          kv_cache_memory_bytes=args.kv_gib << 30)
    engine = LLMEngine(config, model, tokenizer=None)
    calls: list[tuple[int, int]] = []  # (tokens, distinct experts) per gating call, in layer order

    def record(fn):
        def wrapped(logits, k, *a, **kw):
            weights, ids = fn(logits, k, *a, **kw)
            calls.append((ids.shape[0], int(ids.unique().numel())))
            return weights, ids
        return wrapped

    saved = ops.softmax_topk, ops.grouped_topk
    ops.softmax_topk, ops.grouped_topk = record(saved[0]), record(saved[1])
    try:
        vocab = engine.model_config.vocab_size
        gen = torch.Generator().manual_seed(args.seed + 1)
        for i in range(batch):
            prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=args.decode_steps + 1, ignore_eos=True))
        steps = []
        while engine.has_unfinished():
            calls.clear()
            engine.step()
            steps.append(list(calls))
    finally:
        ops.softmax_topk, ops.grouped_topk = saved
    moe = engine.model_config.moe
    experts, k = moe.n_routed_experts, moe.num_experts_per_tok
    kinds = {"prefill": [s for s in steps if s and s[0][0] > batch], "decode": [s for s in steps if s and s[0][0] == batch]}
    out = {"model": name, "batch": batch, "experts": experts, "top_k": k}
    for kind, group in kinds.items():
        if not group:
            continue
        tokens = group[0][0][0]
        touched = [d for step in group for _, d in step]
        out[kind] = dict(tokens=tokens, steps=len(group), layers=len(group[0]),
                         mean_distinct=sum(touched) / len(touched), min_distinct=min(touched),
                         uniform_expectation=uniform_distinct(experts, tokens, k))
    del engine, model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bs.add_script_args(p)
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--kv-gib", type=int, default=4)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.device, args.batches, args.prompt_len, args.kv_gib = ["tiny"], "cpu", [1, 3], 16, 1
    bs.ensure_importable()
    results = []
    for name in args.models:
        for batch in args.batches:
            r = measure(name, batch, args)
            results.append(r)
            for kind in ("prefill", "decode"):
                if kind in r:
                    x = r[kind]
                    print(f"{name} batch {batch} {kind} ({x['tokens']} tokens, {x['layers']} MoE layers): "
                          f"{x['mean_distinct']:.1f} distinct experts per layer (min {x['min_distinct']}) of "
                          f"{r['experts']}; uniform routing: {x['uniform_expectation']:.1f}", flush=True)
    out = Path(args.out_dir or os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_spread.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
