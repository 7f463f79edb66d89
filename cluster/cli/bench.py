"""`moeserve bench`: drive a running server and report throughput, TTFT and TPOT percentiles."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys

import grpc

from moeserve.cluster.cli.generate import add_connection_args, connect
from moeserve.router import bench


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test a running server",
                       description="Send token-id prompts (ignore_eos, so lengths are exact) to a running "
                                   "server at a Poisson rate or a fixed concurrency; report requests/s, "
                                   "output tokens/s, TTFT and TPOT p50/p90/p99.")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    load.add_argument("--concurrency", type=int, help="closed loop: keep this many requests in flight (default 1)")
    p.add_argument("--max-concurrency", type=int, help="with --rate: cap on requests in flight")
    p.add_argument("--num-requests", type=int, default=100, help="requests to send (default 100)")
    p.add_argument("--prompt-len", type=bench.Distribution.parse, default=bench.Distribution.parse("256"),
                   metavar="DIST", help="prompt tokens: N, uniform:A:B, normal:MEAN:STD, lognormal:MEDIAN:SIGMA "
                                        "(default 256)")
    p.add_argument("--output-len", type=bench.Distribution.parse, default=bench.Distribution.parse("64"),
                   metavar="DIST", help="new tokens per request, same forms (default 64)")
    p.add_argument("--shared-prefix-len", type=int, default=0, metavar="N",
                   help="every prompt begins with one of --num-shared-prefixes prefixes of N tokens, then its own "
                        "--prompt-len tokens (default 0: no shared prefix)")
    p.add_argument("--num-shared-prefixes", type=int, default=1, metavar="K",
                   help="distinct shared prefixes, taken in turn (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrivals (default 0)")
    p.add_argument("--warmup", type=int, default=0, help="requests sent one by one first, not counted")
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")
    p.add_argument("--out", metavar="JSON", help="write the config, summary and per-request timings here")
    add_connection_args(p)
    p.set_defaults(func=main)


async def run_bench(args: argparse.Namespace) -> dict:
    concurrency = args.concurrency if args.rate is None else args.max_concurrency
    cfg = bench.BenchConfig(
        num_requests=args.num_requests, prompt_len=args.prompt_len, output_len=args.output_len,
        rate=math.inf if args.rate is None else args.rate,
        concurrency=(concurrency or 1) if args.rate is None else concurrency,
        seed=args.seed, warmup=args.warmup, timeout_s=args.timeout, shared_prefix_len=args.shared_prefix_len,
        num_shared_prefixes=args.num_shared_prefixes, extra={"address": args.address},
    )
    async with connect(args) as client:
        info = await client.model_info(timeout=30)
        limits = dict(vocab_size=info.vocab_size, context_length=info.context_length,
                      max_prompt_tokens=info.max_prompt_tokens, max_tokens_limit=info.max_tokens_limit)
        shared = dict(shared_prefix_len=cfg.shared_prefix_len, num_shared_prefixes=cfg.num_shared_prefixes)
        items, clipped = bench.make_workload(cfg.num_requests, cfg.prompt_len, cfg.output_len, seed=cfg.seed,
                                             **limits, **shared)
        # the warm-up's prompts share no prefix with the measured ones: nothing measured is cached by the warm-up
        warm, _ = bench.make_workload(cfg.warmup, cfg.prompt_len, cfg.output_len, seed=cfg.seed + 1, **limits)
        cfg.extra.update(model=info.model_name or info.architecture, clipped_requests=clipped)
        if clipped:
            print(f"note: {clipped} requests were cut to the server's limits "
                  f"(context {info.context_length} tokens)", file=sys.stderr)
        return await bench.run(client, items, cfg, warm)


def main(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(run_bench(args))
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return report(result, args)


def report(result: dict, args: argparse.Namespace) -> int:
    """Print the summary, write --out; exit status 1 when a request failed."""
    print(bench.format_summary(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {args.out}")
    return 0 if result["summary"]["failed"] == 0 else 1
