"""What each front costs: the same streamed requests through the OpenAI-compatible HTTP front, the gRPC edge, and
the engine itself in the server's process (no front at all: the limit a front can reach).

One in-process `moeserve serve --http-port 0 --no-prefix-caching` (the demo model unless --model; no prefix cache,
so the runs, which repeat the prompts, cost the same); the three ways run the same
requests (--prompt-len random token ids, --new-tokens each with ignore_eos, greedy) at the same fixed concurrency,
each after a warm-up, in the order engine, gRPC, HTTP, then again in reverse (so drift hits every front alike); a
way's figures are the better of its two runs by TPOT p50. Each request is timed the same way in all three: from
sending to its first token (TTFT) and between its tokens (TPOT).

    python benchmarks/bench_http_front.py                  # CPU: the demo model
    python benchmarks/bench_http_front.py --model DIR --device cuda --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path


def _stats(values: list[float]) -> dict:
    from moeserve.router.bench import percentile

    ms = [v * 1e3 for v in values]
    return {q: percentile(ms, n) for q, n in (("p50", 50), ("p90", 90))}


async def drive(stream_one, prompts: list[list[int]], concurrency: int) -> dict:
    """Run every prompt through `stream_one(i, prompt)` (an async iterator of token counts) at `concurrency`."""
    queue = list(enumerate(prompts))
    ttft, tpot, tokens = [], [], 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i, prompt = queue.pop(0)
            start = time.perf_counter()
            first = last = None
            n = 0
            async for count in stream_one(i, prompt):
                if count:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += count
            tokens += n
            ttft.append(first - start)
            if n > 1:
                tpot.append((last - first) / (n - 1))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot), "output_tok_s": tokens / elapsed,
            "requests": len(prompts)}


async def run(args) -> dict:
    import aiohttp

    from moeserve.cluster.cli import build_parser
    from moeserve.cluster.cli.serve import start_server
    from moeserve.router.client import AsyncClient
    from moeserve.router.sequence import SamplingParams

    argv = ["serve", "--port", "0", "--http-port", "0", "--device", args.device, "--max-num-seqs",
            str(args.concurrency), "--batch-wait-ms", "0", "--no-prefix-caching"] + (["--model", args.model] if args.model else [])
    serving = await start_server(build_parser().parse_args(argv))
    server = serving.server
    results: dict = {}
    try:
        vocab = server.servicer.limits.vocab_size
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
        warm = prompts[:args.concurrency]
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
        url = f"http://127.0.0.1:{server.http.port}/v1/completions"

        async def engine_stream(i, prompt, tag=[0]):  # noqa: B006 - a counter for unique ids
            tag[0] += 1
            async for out in server.engine.generate(f"direct-{tag[0]}", prompt, params):
                yield len(out.new_token_ids)

        async with AsyncClient(server.address) as client, aiohttp.ClientSession() as http:
            async def grpc_stream(i, prompt):
                async for msg in client.generate_stream(token_ids=prompt, max_tokens=args.new_tokens,
                                                        ignore_eos=True):
                    yield len(msg.token_ids)

            async def http_stream(i, prompt):
                body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                async with http.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            yield len(json.loads(line[6:])["choices"][0]["token_ids"])

            ways = {"engine": engine_stream, "grpc": grpc_stream, "http": http_stream}
            for order in (list(ways), list(reversed(ways))):
                for name in order:
                    await drive(ways[name], warm, args.concurrency)
                    r = await drive(ways[name], prompts, args.concurrency)
                    best = results.get(name)
                    if best is None or r["tpot_ms"]["p50"] < best["tpot_ms"]["p50"]:
                        results[name] = r
    finally:
        await serving.stop(1.0)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=32, help="measured requests per run (default 32)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."), help="where bench_http_front.json goes")
    args = p.parse_args()
    import torch

    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results = asyncio.run(run(args))
    print(f"## fronts, {args.model or 'demo model'} on {args.device}, {started}")
    print(f"{args.requests} streamed requests at concurrency {args.concurrency}: {args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens each (the better of two runs per way)\n")
    print("| way | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | TPOT p90 ms | output tok/s | vs engine |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = results["engine"]["output_tok_s"]
    for name, r in results.items():
        print(f"| {name} | {r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p90']:.1f} | {r['tpot_ms']['p50']:.2f} | "
              f"{r['tpot_ms']['p90']:.2f} | {r['output_tok_s']:.0f} | {r['output_tok_s'] / base:.2f}x |")
    out = Path(args.out_dir) / "bench_http_front.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "started": started, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
