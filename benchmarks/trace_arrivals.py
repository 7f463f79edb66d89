"""What each prompt step of a bench_serving run overlapped: the requests still being sent while it ran.

bench_serving.py --out-dir writes trace_<model>_server.json (every engine step: wall-clock start, ms, tokens) and
trace_<model>_client.json (per concurrency level: every request's send time). This prints, for every step of more
than --min-tokens tokens, its start, its length, and how many requests the client sent while it ran (and in the
20 ms before it): a prompt step that ran while requests were still arriving shared the server's interpreter with
the event loop taking them in (the gRPC edge, one thread), which an eager step needs to launch its kernels.

    python3 benchmarks/trace_arrivals.py OUT_DIR [--model qwen3-30b-a3b] [--min-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def prompt_steps(server: dict, client: dict, min_tokens: int, before_s: float = 0.02) -> list[dict]:
    """Each step of at least min_tokens tokens with the number of requests sent during it and just before it."""
    sends = sorted(level["started"] + r["start"] for level in client.values() for r in level["requests"])
    fields = server["steps_fields"]
    out = []
    for row in server["steps"]:
        step = dict(zip(fields, row))
        if step["tokens"] < min_tokens:
            continue
        start, end = step["start"], step["start"] + step["ms"] / 1e3
        out.append(dict(start=start, ms=step["ms"], tokens=step["tokens"], graphed=step["graphed"],
                        sent_during=sum(start <= t < end for t in sends),
                        sent_before=sum(start - before_s <= t < start for t in sends)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--model", default=None, help="the model's traces (default: every pair in the directory)")
    p.add_argument("--min-tokens", type=int, default=1024, help="steps of at least this many tokens (default 1024)")
    args = p.parse_args(argv)
    servers = sorted(args.out_dir.glob(f"trace_{args.model or '*'}_server.json"))
    if not servers:
        p.error(f"no trace_*_server.json in {args.out_dir}")
    for path in servers:
        model = path.name[len("trace_"):-len("_server.json")]
        client_path = path.with_name(f"trace_{model}_client.json")
        if not client_path.exists():
            print(f"{model}: no {client_path.name}", file=sys.stderr)
            continue
        steps = prompt_steps(json.loads(path.read_text()), json.loads(client_path.read_text()), args.min_tokens)
        t0 = steps[0]["start"] if steps else 0.0
        print(f"{model}: {len(steps)} steps of {args.min_tokens} tokens or more")
        for s in steps:
            print(f"  +{s['start'] - t0:8.3f} s  {s['tokens']:6d} tokens  {s['ms']:7.1f} ms  "
                  f"{'graph' if s['graphed'] else 'eager'}  requests sent during it {s['sent_during']:3d}, "
                  f"in the 20 ms before {s['sent_before']:3d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
