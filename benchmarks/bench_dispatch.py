"""The dispatcher's own cost per MoE layer: what routing rows to expert groups adds besides the experts' work.

Over N in-process expert groups (`local` transport, no copies, no other process) it times one MoE layer
three ways, best of 5 runs of --iters calls each:
  fused      the single-process kernels.ops.fused_experts over all experts (no dispatch at all);
  dispatch   the dispatcher (router/dispatch.py) over the N groups, all told;
  groups     of that, the time inside the groups' `run` (their experts' work, as a Ray actor would do it);
and prints dispatch − groups: the dispatcher's own work (sorting pairs by expert, choosing replicas,
building each group's batch, putting the answers back in token order). That is the part every transport
pays on the trunk's step thread, per MoE layer. The output is checked to equal fused bit for bit.

    python benchmarks/bench_dispatch.py                              # CPU: demo-model experts, 1/2/4 groups
    python benchmarks/bench_dispatch.py --shape v2-lite --device cuda --tokens 1,16,64,256
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SHAPES = {
    "demo": dict(hidden=64, inter=32, experts=16, topk=4, dtype="float32"),
    "v2-lite": dict(hidden=2048, inter=1408, experts=64, topk=6, dtype="bfloat16"),
    "qwen3": dict(hidden=2048, inter=768, experts=128, topk=8, dtype="bfloat16"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--groups", default="1,2,4", help="expert groups (default 1,2,4)")
    p.add_argument("--tokens", default="1,8,32", help="tokens per layer (default 1,8,32)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a Ray expert group runs)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = p.parse_args()

    import torch

    from moeserve.experts.backend import local_serving_set
    from moeserve.experts.weights import RandomWeights
    from moeserve.experts.worker import ExpertGroupWorker
    from moeserve.kernels import ops
    from moeserve.router.dispatch import ExpertDispatcher, StaticSource
    from moeserve.router.transport.local import LocalTransport

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    device = torch.device(args.device)
    E, k, H = shape["experts"], shape["topk"], shape["hidden"]
    dtype = getattr(torch, shape["dtype"])
    source = RandomWeights((1,), H, shape["inter"], E, dtype=shape["dtype"])
    full = source.load(list(range(E)), device)[1]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    inside = [0.0]
    run = ExpertGroupWorker.run

    def timed_run(self, batch):
        start = time.perf_counter()
        try:
            return run(self, batch)
        finally:
            inside[0] += time.perf_counter() - start

    ExpertGroupWorker.run = timed_run

    def best(fn) -> tuple[float, float]:
        """(seconds per call, of which inside the groups), the best of 5 runs."""
        for _ in range(20):
            fn()
        out = (float("inf"), 0.0)
        for _ in range(5):
            sync()
            inside[0] = 0.0
            start = time.perf_counter()
            for _ in range(args.iters):
                fn()
            sync()
            total = (time.perf_counter() - start) / args.iters
            if total < out[0]:
                out = (total, inside[0] / args.iters)
        return out

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rows = []
    for groups in [int(g) for g in args.groups.split(",")]:
        dispatcher = ExpertDispatcher(StaticSource(local_serving_set(source, E, groups, device)), LocalTransport(), [1],
                                      num_experts=E)
        for t in [int(x) for x in args.tokens.split(",")]:
            g = torch.Generator().manual_seed(t)
            x = torch.randn(t, H, generator=g).to(dtype).to(device)
            w, ids = torch.softmax(torch.randn(t, E, generator=g), -1).topk(k, dim=-1)
            ids, w = ids.to(device), w.to(device)
            if not torch.equal(dispatcher(1, x, ids, w), ops.fused_experts(x, full[0], full[1], ids, w)):
                raise SystemExit(f"{groups} groups, {t} tokens: the dispatcher's output differs from fused_experts")
            fused, _ = best(lambda: ops.fused_experts(x, full[0], full[1], ids, w))
            total, in_groups = best(lambda: dispatcher(1, x, ids, w))
            rows.append(dict(groups=groups, tokens=t, fused_us=fused * 1e6, dispatch_us=total * 1e6,
                             groups_us=in_groups * 1e6, own_us=(total - in_groups) * 1e6))
    print(f"## dispatcher cost per MoE layer, {args.shape} experts (H {H}, I {shape['inter']}, {E} experts, top-{k}, "
          f"{shape['dtype']}) on {args.device}, {args.threads} torch thread(s), {started}")
    print("| groups | tokens | fused µs | dispatch µs | in the groups µs | dispatcher's own µs |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['groups']} | {r['tokens']} | {r['fused_us']:.0f} | {r['dispatch_us']:.0f} | {r['groups_us']:.0f} | "
              f"{r['own_us']:.0f} |")
    out = Path(args.out_dir) / "bench_dispatch.json"
    out.write_text(json.dumps({"args": vars(args), "started": started, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
