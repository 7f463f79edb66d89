"""What the sampling extras cost a decode step: logprobs, logit bias, penalties and structured output against plain
sampling, in-process (no gRPC), at one batch size.

For each kind, --batch requests of --prompt-len random tokens are added at once and prefilled; then --steps decode
steps run back to back (one sync before, one after: LLMEngine's look-ahead stays in the timed span) and their mean
is the step time. The kinds:
  plain        greedy, nothing else (the peer: every other kind is measured against it)
  logprobs     logprobs=5 (the chosen token's log-probability and the 5 most likely)
  logit_bias   10 biased tokens
  penalties    presence 0.5 and repetition 1.1: the rows read their history (on the device, steps queued ahead)
  regex        structured output, a regex of letters and spaces (end-of-sequence biased away): a step queued
               ahead is sampled once the previous tokens are fed to the matchers
  json         structured output, a JSON object with one string field (end-of-sequence biased away)
  mixed        one regex row among plain ones: what one structured request costs the others
After the timed steps each kind's last few run under torch's CUDA sync debug mode, which lists every call that made
the host wait for the GPU (one a step is the tokens coming back). The physical limit is the decode step's floor at this batch: the bytes it must read (active weights, KV) over
the copy bandwidth measured in the same run (bench_serving.decode_floor).

A random-weight preset (--model qwen3-30b-a3b, deepseek-v2-lite, ...) has no tokenizer: the structured kinds get a
synthetic byte-level one of the model's vocabulary size (random strings of 1-8 bytes: xgrammar's per-step work
grows with the vocabulary, so a 512-token tokenizer would understate it). --model demo uses the demo model's own.

    python benchmarks/bench_sampling_extras.py                                   # CPU: the demo model
    python benchmarks/bench_sampling_extras.py --model qwen3-30b-a3b --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving as bs  # noqa: E402  (same folder: presets, random models, bandwidth, floor)

KINDS = ("plain", "logprobs", "logit_bias", "penalties", "regex", "json", "mixed")


def synthetic_tokenizer(vocab: int, seed: int = 0):
    """A byte-level BPE tokenizer (no merges) of `vocab` tokens: 256 single bytes, then random strings of 2-8 bytes,
    the last token an end-of-sequence; wrapped as moeserve's Tokenizer."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from moeserve.models.tokenizer import Tokenizer as MoeTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(seed)
    words, seen = list(alphabet), set(alphabet)
    while len(words) < vocab - 1:
        w = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    words.append("<eos>")
    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return MoeTokenizer(tok, [vocab - 1])


def params_of(kind: str, max_tokens: int, eos: list[int]):
    from moeserve.router.sequence import SamplingParams
    from moeserve.router.structured import StructuredOutput

    away = {t: -100.0 for t in eos}
    if kind == "plain":
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    if kind == "logprobs":
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    if kind == "logit_bias":
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, logit_bias={3 + 7 * i: 1.5 for i in range(10)})
    if kind == "penalties":
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, presence_penalty=0.5, repetition_penalty=1.1)
    if kind == "regex":
        return SamplingParams(max_tokens=max_tokens, logit_bias=away,
                              structured_output=StructuredOutput("regex", "[a-z ]+"))
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    return SamplingParams(max_tokens=max_tokens, logit_bias=away,
                          structured_output=StructuredOutput("json_schema", json.dumps(schema)))


def measure(engine, kind: str, args, tag: str) -> dict:
    import torch

    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    ahead = engine.counters["steps_ahead"]
    eos = sorted(set(engine.eos_token_ids) | set(engine.tokenizer.eos_token_ids))
    params = params_of("plain" if kind == "mixed" else kind, args.steps + 4, eos)
    for i in range(args.batch):
        engine.add_request(f"{tag}{i}", torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist(),
                           params_of("regex", args.steps + 4, eos) if kind == "mixed" and i == 0 else params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.requests.values()):
        engine.step()
    engine.step()  # the first decode step: every row past its prompt
    bs._sync(args.device)
    start, running = time.perf_counter(), []
    for _ in range(args.steps):
        running.append(len(engine.requests))
        engine.step()
    bs._sync(args.device)
    ms = (time.perf_counter() - start) * 1e3 / args.steps
    steps, syncs = drain_counting_syncs(engine, args.device)
    return {"kind": kind, "step_ms": ms, "tok_s": sum(running) / args.steps / ms * 1e3,
            "rows_min": min(running), "steps_ahead": engine.counters["steps_ahead"] - ahead,
            "syncs_per_step": sum(syncs.values()) / max(1, steps), "syncs": syncs}


def drain_counting_syncs(engine, device: str) -> tuple[int, dict[str, int]]:
    """Run the engine's last steps (after the timed ones), on a GPU under torch's CUDA sync debug mode: (steps, where
    each synchronising call came from, moeserve's or xgrammar's line, and how often). One a step is the tokens
    coming back; any other makes a step queued ahead wait for the one before it."""
    steps = 0

    def drain() -> None:
        nonlocal steps
        while engine.has_unfinished():
            engine.step()
            steps += 1

    if not device.startswith("cuda"):
        drain()
        return steps, {}
    return steps, bs.synchronising_calls(drain, ("/xgrammar/",))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo, or a random-weight preset of bench_serving (qwen3-30b-a3b, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per kind (default 32)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."), help="where bench_sampling_extras.json goes")
    args = p.parse_args()
    bs.ensure_importable()
    import torch

    from moeserve.router.config import EngineConfig
    from moeserve.router.llm_engine import LLMEngine

    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    common = dict(device=args.device, max_num_seqs=args.batch, max_model_len=args.prompt_len + args.steps + 16,
                  decode_graphs="auto" if cuda else "off", prefill_hold_ms=0)
    # Before the model: its KV cache takes what memory is left (an H100 keeps no room for the copy after).
    bandwidth = bs.measure_bandwidth(args.device, gib=4.0 if cuda else 0.5)
    if args.model == "demo":
        from moeserve.models.demo import ensure_demo_model

        path = ensure_demo_model()
        engine = LLMEngine.from_config(EngineConfig(model=str(path), **common))
        hf = json.loads((path / "config.json").read_text())
        dtype_bytes = 4
    else:
        hf = bs.preset(args.model)
        dtype = torch.bfloat16 if cuda else torch.float32
        model = bs.build_random_model(hf, args.device, dtype, args.seed)
        config = EngineConfig(dtype="bfloat16" if cuda else "float32", **common)
        engine = LLMEngine(config, model, tokenizer=synthetic_tokenizer(model.config.vocab_size, args.seed))
        dtype_bytes = 2 if cuda else 4
    floor = bs.decode_floor(bs.weight_bytes(hf, dtype_bytes), args.batch, args.prompt_len + args.steps // 2, bandwidth)
    measure(engine, "plain", args, "warm-")  # compiles, graph capture at this batch
    rows = [measure(engine, kind, args, f"{kind}-") for kind in args.kinds.split(",")]
    plain = next((r["step_ms"] for r in rows if r["kind"] == "plain"), None)
    print(f"## sampling extras, {args.model} on {args.device}, batch {args.batch}, {started}")
    print(f"{args.steps} decode steps back to back per kind after a {args.prompt_len}-token prompt; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s; decode floor {floor['step_ms']:.3f} ms\n")
    print("| kind | step ms | output tok/s | vs plain | vs floor | rows (min) | steps queued ahead | syncs a step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs = f"{r['step_ms'] / plain:.2f}x" if plain else "-"
        fl = f"{r['step_ms'] / floor['step_ms']:.1f}x"
        print(f"| {r['kind']} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {vs} | {fl} | {r['rows_min']} | "
              f"{r['steps_ahead']} | {r['syncs_per_step']:.1f} |")
    for r in rows:
        if r["syncs"]:
            print(f"{r['kind']}: synchronising calls in its last steps: " +
                  "; ".join(f"{n}x {at}" for at, n in sorted(r["syncs"].items(), key=lambda kv: -kv[1])))
    out = Path(args.out_dir) / "bench_sampling_extras.json"
    out.write_text(json.dumps({"args": vars(args), "started": started, "bandwidth": bandwidth, "floor": floor,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
