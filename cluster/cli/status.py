"""`moeserve status`: expert groups, replicas, the experts each holds, per-expert load and the epoch, and
the edge's live serving figures (batch, KV cache, token rates, TTFT/TPOT) when the admin API has them.

Reads the Admin gRPC service (its own port, default 50052; its own token, MOESERVE_ADMIN_TOKEN).
The connection flags and error printing here are shared by `moeserve scale` and `moeserve drain`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moeserve.cluster.admin_server import ADMIN_TOKEN_ENV, DEFAULT_ADMIN_PORT


def add_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=f"127.0.0.1:{DEFAULT_ADMIN_PORT}",
                   help=f"admin API host:port (default 127.0.0.1:{DEFAULT_ADMIN_PORT}; not the inference port)")
    p.add_argument("--admin-token-file", metavar="PATH",
                   help=f"file holding the admin token (default: ${ADMIN_TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer (default 600)")


def admin_call(args: argparse.Namespace, method: str, request):
    """Call `method` of moeserve.v1.Admin at args.address with the admin token, if any."""
    import grpc

    from moeserve.v1 import admin_pb2_grpc

    token = Path(args.admin_token_file).read_text().strip() if args.admin_token_file else os.environ.get(ADMIN_TOKEN_ENV, "")
    metadata = [("authorization", f"Bearer {token.split(',')[0].strip()}")] if token else []
    with grpc.insecure_channel(args.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        return getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)


def run_admin(args: argparse.Namespace, method: str, request, show) -> int:
    """admin_call, then `show(response)`; gRPC errors are printed as `error: CODE: details`, exit 1."""
    import grpc

    try:
        response = admin_call(args, method, request)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()} (admin API at {args.address})", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    show(response)
    return 0


def format_status(s) -> str:
    """A StatusResponse as the text `moeserve status` prints."""
    lines = [f"cluster {s.cluster}  epoch {s.epoch}  experts {s.num_experts}  dispatchers {s.dispatchers}  "
             f"load window {s.window_s:.0f}s"]
    for g in s.groups:
        lines.append(f"group {g.group_id}  experts {' '.join(map(str, g.experts))}")
        for r in g.replicas:
            lines.append(f"  replica {r.replica_id:<8} {r.state if r.serving else r.state + ' (out of the set)':<10} "
                         f"incarnation {r.incarnation}  {r.device or '-':<6} pid {r.pid:<7} busy {100 * r.busy_share:5.1f}%  "
                         f"rows {r.rows}  restarts {r.restarts}  channels {r.channels}")
    layers = [layer.layer for layer in s.expert_load_by_layer]
    by_layer = {layer.layer: {x.expert: x.tokens for x in layer.experts} for layer in s.expert_load_by_layer}
    holders: dict[int, list[str]] = {}
    for g in s.groups:
        for e in g.experts:
            holders.setdefault(e, []).append(str(g.group_id))
    total = {x.expert: x.tokens for x in s.expert_load}
    lines.append(f"expert load (tokens over {s.window_s:.0f}s)")
    lines.append("  expert  groups  total" + "".join(f"  L{layer:<5}" for layer in layers))
    for e in range(s.num_experts):
        lines.append(f"  {e:<6}  {','.join(holders.get(e, ['-'])):<6}  {total.get(e, 0):<5}"
                     + "".join(f"  {by_layer[layer].get(e, 0):<6}" for layer in layers))
    lines.append("unavailable experts: " + (" ".join(map(str, s.unavailable_experts)) or "none"))
    lines += format_serving(s.serving) if s.HasField("serving") else [
        "serving: no live figures (the admin API runs beside the expert groups of another process, not the edge)"]
    return "\n".join(lines)


def format_serving(v) -> list[str]:
    """The lines of a ServingStatus."""
    kv = f"{v.kv_blocks_used}/{v.kv_blocks_total}" + (
        f" ({100 * v.kv_blocks_used / v.kv_blocks_total:.1f}%)" if v.kv_blocks_total else "")
    workers = v.trunk_workers + v.trunk_workers_starting + v.trunk_workers_draining
    trunk = (f"  trunk workers {v.trunk_workers} ({v.trunk_workers_starting} starting, "
             f"{v.trunk_workers_draining} draining)" if workers else "")
    lines = [f"serving  running {v.running}  waiting {v.waiting}  kv blocks {kv}{trunk}",
             f"  over the last {v.window_s:.1f}s: input {v.input_tokens_per_s:.1f} tokens/s  "
             f"output {v.output_tokens_per_s:.1f} tokens/s  {v.requests_per_s:.2f} requests/s  "
             f"prefix cache hits {100 * v.prefix_cache_hit_rate:.0f}% of prompt tokens"
             + (f"  drafts {v.draft_tokens_per_s:.1f} tokens/s, {100 * v.draft_acceptance_rate:.0f}% kept"
                if v.draft_tokens_per_s else "")]
    for name, label in (("ttft", "ttft"), ("tpot", "tpot")):
        if not v.HasField(name):
            lines.append(f"  {label}  - (the server runs without telemetry: --prometheus-port or --otlp-endpoint)")
            continue
        x = getattr(v, name)
        lines.append(f"  {label}  p50 {_ms(x.p50_s)}  p90 {_ms(x.p90_s)}  p99 {_ms(x.p99_s)}  mean {_ms(x.mean_s)}  "
                     f"({x.count} requests)" if x.count else f"  {label}  - (no requests over the window)")
    return lines


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}ms"


def main(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from moeserve.v1 import admin_pb2

    def show(response) -> None:
        if args.json:
            print(json.dumps(MessageToDict(response, always_print_fields_with_no_presence=True), indent=2))
        else:
            print(format_status(response))

    return run_admin(args, "Status", admin_pb2.StatusRequest(), show)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show expert groups, replicas, per-expert load, the epoch and live figures",
                       description="Show the expert groups, their replicas, the experts each holds, per-expert "
                                   "load and the serving epoch (moeserve.v1.Admin/Status), and the edge's live "
                                   "figures (batch, KV cache, tokens/s; TTFT/TPOT when the server runs with "
                                   "--prometheus-port or --otlp-endpoint).")
    add_admin_args(p)
    p.add_argument("--json", action="store_true", help="print the StatusResponse as JSON")
    p.set_defaults(func=main)
