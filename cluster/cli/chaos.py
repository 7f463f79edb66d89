"""`moeserve chaos SCENARIO|all`: fault-injection runs against a live embedded cluster (see moeserve.chaos)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from moeserve.chaos.scenarios import SCENARIOS

    listing = "\n".join(f"  {s.name:20} {s.description}" for s in SCENARIOS.values())
    p = sub.add_parser(
        "chaos", help="run fault-injection scenarios against an embedded cluster",
        description="Start an embedded cluster (gRPC edge on loopback, Ray expert groups), keep steady load on it, "
                    "inject one kind of fault again and again, and count what was lost.\n\nscenarios:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario names, or 'all'")
    p.add_argument("--requests", type=int, default=200, help="send at least this many requests (default 200)")
    p.add_argument("--faults", type=int, default=10, help="inject this many faults (default 10)")
    p.add_argument("--every", type=float, default=None, metavar="S",
                   help="inject the next fault S seconds after the last one recovered (default: spread the faults "
                        "evenly over the requests)")
    p.add_argument("--concurrency", type=int, default=8, help="requests kept in flight (default 8)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    p.add_argument("--shared-prefix-tokens", type=int, default=32, metavar="N",
                   help="every other prompt begins with one prefix of N tokens, shared through the prefix cache "
                        "(default 32; 0: none)")
    p.add_argument("--model", metavar="DIR", help="HF-format checkpoint (default: the demo model)")
    p.add_argument("--json", action="store_true", help="also print every report as one JSON line")
    p.add_argument("--transport", choices=("ray", "gloo"), default="ray",
                   help="how the trunk reaches the expert groups: ray (actor calls, default) or gloo (standing channels)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from moeserve.chaos.runner import run
    from moeserve.chaos.scenarios import resolve
    from moeserve.chaos.workload import Workload

    try:
        scenarios = resolve(args.scenarios)
        workload = Workload(requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                            shared_prefix_tokens=args.shared_prefix_tokens)
        if args.faults < 0:
            raise ValueError(f"--faults must be >= 0, got {args.faults}")
        if args.every is not None and args.every < 0:
            raise ValueError(f"--every must be >= 0 seconds, got {args.every}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reports = run(scenarios, workload, args.faults, args.model, args.every, log=lambda line: print(line, flush=True),
                  transport=args.transport)
    if args.json:
        for r in reports:
            print(json.dumps({**asdict(r), "ok": r.ok}), flush=True)
    failed = [r.scenario for r in reports if not r.ok]
    print(f"chaos: {len(reports) - len(failed)}/{len(reports)} scenarios passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
