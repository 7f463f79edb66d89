"""What prefix caching is worth: TTFT and throughput of prompts that share a long prefix, caching on vs off.

One run serves the same model three times over gRPC (an in-process `moeserve serve`, one after another) and
drives each with `router.bench` at a fixed concurrency:
  on     prefix caching on; every prompt is one of --prefixes shared prefixes of --prefix-len tokens, then its
         own --own-len tokens (a system prompt, few-shot examples, a multi-turn history);
  off    the same requests with `--no-prefix-caching`: every prompt is computed in full (the peer: what the
         server did before, and what a server without prefix caching does);
  floor  prefix caching off, prompts of the own tokens alone: no prefix costs anything, the least TTFT a
         cache hit can give (its limit; a hit still reads the cached KV in attention, so it is not free).
With --trunk-workers N the trunk runs in N trunk workers behind the one edge (Ray actors), and one more run
measures what prefix-affine routing is worth:
  least-busy  prefix caching on, every request to the least busy worker (`--trunk-routing least-busy`): a
              prefix is computed, and cached, on each worker its requests happen to reach (the peer: load-only
              routing, as a plain load balancer in front of N servers does).
Each is preceded by a warm-up that shares no prefix with the measured requests. The engine's own counters
give the hit rate (prefix_cache_hit_tokens / prefix_cache_queried_tokens).

    python benchmarks/bench_prefix_cache.py                    # CPU: the demo model
    python benchmarks/bench_prefix_cache.py --trunk-workers 2 --prefixes 16   # routing: many prefixes, 2 workers
    python benchmarks/bench_prefix_cache.py --model DIR --device cuda --prefix-len 2048 --own-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def serve_and_bench(args, name: str, caching: bool, prefix_len: int, routing: str = "prefix") -> dict:
    from moeserve.cluster.cli import build_parser
    from moeserve.cluster.cli.serve import start_server
    from moeserve.router import bench
    from moeserve.router.client import AsyncClient

    argv = ["serve", "--port", "0", "--device", args.device, "--max-num-seqs", str(args.concurrency),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--batch-wait-ms", "0"]
    argv += ["--model", args.model] if args.model else []
    argv += [] if caching else ["--no-prefix-caching"]
    if args.trunk_workers:
        argv += ["--trunk-workers", str(args.trunk_workers), "--trunk-routing", routing]
    serving = await start_server(build_parser().parse_args(argv))
    try:
        engine = serving.server.engine  # AsyncEngine: stats() of its core
        async with AsyncClient(serving.server.address) as client:
            info = await client.model_info(timeout=30)
            limits = dict(vocab_size=info.vocab_size, context_length=info.context_length,
                          max_prompt_tokens=info.max_prompt_tokens, max_tokens_limit=info.max_tokens_limit)
            shape = dict(shared_prefix_len=prefix_len, num_shared_prefixes=args.prefixes)
            own, out = bench.Distribution("fixed", args.own_len), bench.Distribution("fixed", args.new_tokens)
            items, clipped = bench.make_workload(args.requests, own, out, seed=args.seed, **limits, **shape)
            if clipped:
                raise SystemExit(f"{clipped} requests do not fit the context of {info.context_length} tokens")
            warm, _ = bench.make_workload(args.concurrency, own, out, seed=args.seed + 1, **limits, **shape)
            cfg = bench.BenchConfig(num_requests=args.requests, prompt_len=own, output_len=out,
                                    concurrency=args.concurrency, seed=args.seed, **shape)
            await bench.run(client, warm, bench.BenchConfig(num_requests=len(warm), prompt_len=own, output_len=out,
                                                            concurrency=args.concurrency))
            mid = engine.stats()
            result = await bench.run(client, items, cfg)
            after = engine.stats()
    finally:
        await serving.stop(1.0)
    queried = after["prefix_cache_queried_tokens"] - mid["prefix_cache_queried_tokens"]
    hit = after["prefix_cache_hit_tokens"] - mid["prefix_cache_hit_tokens"]
    s = result["summary"]
    return {"name": name, "prefix_caching": caching, "prefix_len": prefix_len, "summary": s,
            "hit_rate": hit / queried if queried else 0.0, "computed_tokens": after["tokens_computed"] - mid["tokens_computed"],
            "routed_by_prefix": after.get("requests_routed_by_prefix", 0) - mid.get("requests_routed_by_prefix", 0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prefix-len", type=int, default=512, help="tokens of each shared prefix (default 512)")
    p.add_argument("--prefixes", type=int, default=2, help="distinct shared prefixes, taken in turn (default 2)")
    p.add_argument("--own-len", type=int, default=32, help="each prompt's own tokens after the prefix (default 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--requests", type=int, default=48, help="measured requests per run (default 48)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trunk-workers", type=int, default=0, metavar="N",
                   help="serve with N trunk workers (Ray actors) and add the least-busy routing run (default 0)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."), help="where bench_prefix_cache.json goes")
    args = p.parse_args()

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1) if args.device == "cpu" else torch.get_num_threads())
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    plan = [("on", True, args.prefix_len, "prefix"), ("off", False, args.prefix_len, "prefix"),
            ("floor", False, 0, "prefix")]
    if args.trunk_workers:
        plan.insert(1, ("least-busy", True, args.prefix_len, "least-busy"))
    runs = []
    try:
        for name, caching, prefix_len, routing in plan:
            runs.append(asyncio.run(serve_and_bench(args, name, caching, prefix_len, routing)))
    finally:
        if args.trunk_workers:
            import ray

            ray.shutdown()
    where = f", {args.trunk_workers} trunk workers" if args.trunk_workers else ""
    print(f"## prefix caching, {args.model or 'demo model'} on {args.device}{where}, {started}")
    print(f"{args.requests} requests at concurrency {args.concurrency}: {args.prefixes} shared prefixes of "
          f"{args.prefix_len} tokens + {args.own_len} own tokens, {args.new_tokens} new tokens each\n")
    print("| run | prompt tokens | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | output tok/s | tokens computed | hit rate |"
          + (" routed by prefix |" if args.trunk_workers else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.trunk_workers else ""))
    for r in runs:
        s = r["summary"]
        print(f"| {r['name']} | {r['prefix_len'] + args.own_len} | {s['ttft_ms']['p50']:.1f} | {s['ttft_ms']['p90']:.1f} | "
              f"{s['tpot_ms']['p50']:.1f} | {s['output_token_throughput']:.0f} | {r['computed_tokens']} | "
              f"{r['hit_rate']:.0%} |" + (f" {r['routed_by_prefix']} |" if args.trunk_workers else ""))
    ttft = {r["name"]: r["summary"]["ttft_ms"]["p50"] for r in runs}
    on, off, floor = ttft["on"], ttft["off"], ttft["floor"]
    print(f"\nTTFT p50: caching on is {off / on:.1f}x faster than off; the floor (no prefix at all) is {floor:.1f} ms, "
          f"on is {on / floor:.2f}x the floor")
    if args.trunk_workers:
        print(f"prefix routing vs least-busy: TTFT p50 {ttft['least-busy'] / on:.2f}x lower, "
              f"tokens computed {runs[1]['computed_tokens'] / max(1, runs[0]['computed_tokens']):.2f}x fewer")
    out = Path(args.out_dir) / "bench_prefix_cache.json"
    out.write_text(json.dumps({"args": vars(args), "started": started, "runs": runs}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
