"""Per-MoE-layer cost of the `ray` and `gloo` expert transports against `local`, and what bounds it.

For each decode batch size T it times one MoE layer's routed experts, four ways:
  fused  the single-process kernels.ops.fused_experts over all experts (no dispatch at all);
  local  the dispatcher over N in-process expert groups (`local` transport);
  ray    the dispatcher over N expert-group Ray actors (`ray` transport; rows through Ray calls);
  gloo   the dispatcher over the same actors (`gloo` transport; rows over standing gloo channels).
and prints microseconds per layer, the MoE-path tokens/s that allows (T / (layers x per-layer)),
the physical limit (weight bytes of the experts the batch touches over the measured memory bandwidth)
the round trip of an empty actor call, and an echo of the rows to N actors as tasks vs as one Ray
Compiled Graph (the per-call cost without per-call submission). Each time is the best of 5 runs.
It also runs the engine end to end (output tokens/s, experts in-process vs in the N Ray groups over
each transport): on CPU with the demo checkpoint, on GPU with a random-weight trunk of the same shape.

    python benchmarks/bench_transport.py                 # CPU: the demo model, 2 groups
    python benchmarks/bench_transport.py --gpu           # one GPU: random DeepSeek-V2-Lite-shaped experts
                                                         # (H 2048, I 1408, 64 experts, top-6, 26 MoE layers),
                                                         # 2 groups sharing the GPU
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("cluster", "experts", "router", "kernels", "models", "chaos")
V2_LITE = dict(hidden=2048, inter=1408, experts=64, topk=6, layers=27, first_dense=1)


def importable() -> None:
    """Make `moeserve` importable here and in Ray workers, installed or not (the GPU box has no build)."""
    try:
        import moeserve.experts  # noqa: F401
        return
    except ImportError:
        pass
    ns = Path(tempfile.gettempdir()) / "moeserve_bench_ns"
    (ns / "moeserve").mkdir(parents=True, exist_ok=True)
    for name in CODE_FOLDERS:
        link = ns / "moeserve" / name
        if not link.exists():
            link.symlink_to(ROOT / name, target_is_directory=True)
    sys.path.insert(0, str(ns))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ns), os.environ.get("PYTHONPATH")) if p)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device) -> float:
    """Bytes/s of a large copy (read + write) on `device`."""
    import torch

    n = (1 << 30) if device.type == "cuda" else (1 << 28)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - start)


def routing(tokens: int, num_experts: int, k: int, hidden: int, dtype, device, seed: int):
    """Random hidden states and a softmax top-k routing, as a random-weight gate gives."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, num_experts, generator=g)
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return x.to(device), ids.to(device), w.float().to(device)


def time_layers(fn, layers, cases, device, iters: int, repeats: int = 5) -> dict[int, float]:
    """Seconds per MoE layer for each batch size: the best of `repeats` runs of `iters` steps of every
    layer (the best, so that other work on a shared machine does not count)."""
    out = {}
    for t, (x, ids, w) in cases.items():
        for _ in range(3):  # warm-up: kernels compiled, buffers sized, actor threads awake
            for layer in layers:
                fn(layer, x, ids, w)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                for layer in layers:
                    fn(layer, x, ids, w)
            sync(device)
            best = min(best, (time.perf_counter() - start) / (iters * len(layers)))
        out[t] = best
    return out


def measure(args, source, spec, device, dtype) -> dict:
    import ray
    import torch

    from moeserve.cluster.controller import ControllerConfig, start_controller
    from moeserve.cluster.epoch import ControllerSource
    from moeserve.experts.backend import local_serving_set
    from moeserve.experts.group import GroupResources
    from moeserve.kernels import ops
    from moeserve.router.dispatch import ExpertDispatcher, StaticSource
    from moeserve.router.transport import ACTOR_TRANSPORTS, make_transport
    from moeserve.router.transport.local import LocalTransport

    layers = list(spec["moe_layers"])
    E, k, H = spec["experts"], spec["topk"], spec["hidden"]
    cases = {t: routing(t, E, k, H, dtype, device, seed=t) for t in args.tokens}
    res: dict = {"per_layer_s": {}}

    full = source.load(list(range(E)), device)  # fused: the single-process path
    res["per_layer_s"]["fused"] = time_layers(
        lambda layer, x, ids, w: ops.fused_experts(x, full[layer][0], full[layer][1], ids, w), layers, cases, device, args.iters)
    trunk = random_trunk(spec["hf"], device, dtype) if "hf" in spec else None
    if trunk is not None:  # the whole engine, experts in-process: what `moeserve serve` runs by default
        from moeserve.models.local_experts import LocalExperts

        res["engine_tokens_per_s"] = {"local": trunk_tokens_per_s(args, trunk, LocalExperts(full), device)}
        trunk.set_expert_backend(None)
    del full
    serving = local_serving_set(source, E, args.groups, device)
    local = ExpertDispatcher(StaticSource(serving), LocalTransport(), layers, num_experts=E)
    res["per_layer_s"]["local"] = time_layers(local, layers, cases, device, args.iters)
    del local, serving
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the groups' actors need this memory

    env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0  # told, not detected: no surprise pending actors
    ray.init(num_cpus=max(2, args.groups + 1), num_gpus=gpus, include_dashboard=False, namespace="bench-transport",
             runtime_env=env)
    try:
        gpu = device.type == "cuda"
        cfg = ControllerConfig(weights=source, num_experts=E, num_groups=args.groups, name="bench",
                               namespace="bench-transport", detached_groups=False, start_timeout_s=600.0,
                               resources=GroupResources(num_cpus=0, num_gpus=(1.0 / args.groups) if gpu else 0.0,
                                                        torch_threads=torch.get_num_threads()))
        controller = start_controller(cfg)
        for name in ACTOR_TRANSPORTS:
            remote = ExpertDispatcher(ControllerSource(controller), make_transport(name), layers, num_experts=E)
            res["per_layer_s"][name] = time_layers(remote, layers, cases, device, args.iters)
            res[f"{name}_counters"] = dict(remote.counters)
            if trunk is not None:
                res["engine_tokens_per_s"][name] = trunk_tokens_per_s(args, trunk, remote, device)
            if name == "ray":
                actor = next(iter(remote.serving.handles.values()))
            remote.close()
        if trunk is None and args.engine:
            res["engine_tokens_per_s"] = engine_run(args, controller)
        res["empty_call_s"] = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(40):
                ray.get(actor.health.remote())
            res["empty_call_s"] = min(res["empty_call_s"], (time.perf_counter() - start) / 40)
        probe_t = min(cases, key=lambda t: abs(t - 32))  # small enough for a compiled graph's default channel
        res["probe"] = call_probe(args.groups, cases[probe_t][0].float().cpu().numpy())
        res["probe"]["tokens"] = probe_t
        ray.get(controller.shutdown.remote())
    finally:
        ray.shutdown()
    # Physical limit: the touched experts' weights must be read once per layer.
    bw = bandwidth(device)
    per_expert = 3 * H * spec["inter"] * torch.empty((), dtype=dtype).element_size()
    res["bandwidth_Bps"] = bw
    res["limit_s"] = {t: int(torch.unique(ids).numel()) * per_expert / bw for t, (_, ids, _) in cases.items()}
    res["touched_experts"] = {t: int(torch.unique(ids).numel()) for t, (_, ids, _) in cases.items()}
    return res


@functools.cache
def _echo_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, x):
            return x

    return Echo


def call_probe(groups: int, payload) -> dict[str, float]:
    """Round trip of `groups` echo actors carrying `payload` (numpy): one task each vs one Ray Compiled
    Graph execution (persistent channels), the remedy for the per-call cost measured above."""
    import ray
    from ray.dag import InputNode, MultiOutputNode

    actors = [_echo_actor().remote() for _ in range(groups)]
    ray.get([a.echo.remote(0) for a in actors])

    def best(fn, n=100):
        out = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out = min(out, (time.perf_counter() - start) / n)
        return out

    res = {"tasks_s": best(lambda: ray.get([a.echo.remote(payload) for a in actors]))}
    try:
        with InputNode() as inp:
            dag = MultiOutputNode([a.echo.bind(inp) for a in actors])
        compiled = dag.experimental_compile()
        try:
            ray.get(compiled.execute(payload))
            res["compiled_graph_s"] = best(lambda: ray.get(compiled.execute(payload)))
        finally:
            compiled.teardown()
    except Exception as exc:  # noqa: BLE001 - an optional probe: report, do not fail the benchmark
        res["compiled_graph_error"] = repr(exc)
    for a in actors:
        ray.kill(a)
    return res


def engine_run(args, controller) -> dict[str, float]:
    """Output tokens/s of the whole engine (CPU demo model): experts in-process vs in the Ray groups over each
    transport."""
    import torch

    from moeserve.experts.backend import ray_expert_backend
    from moeserve.models.demo import ensure_demo_model
    from moeserve.router.transport import ACTOR_TRANSPORTS
    from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

    path = str(ensure_demo_model())
    prompts = [torch.randint(0, 400, (16,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    out = {}
    backends = [("local", None)] + [(name, ray_expert_backend(controller, transport=name)) for name in ACTOR_TRANSPORTS]
    for name, backend in backends:
        engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=512, block_size=16, load_experts=backend is None,
                                                    expert_backend=backend))
        engine.generate_batch(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        out[name] = 0.0
        for _ in range(2):  # the better of two runs
            start = time.perf_counter()
            outs = engine.generate_batch(prompts, params)
            out[name] = max(out[name], sum(len(o.new_token_ids) for o in outs) / (time.perf_counter() - start))
        if backend is not None:
            engine.model.experts_backend.close()
    return out


def random_trunk(hf: dict, device, dtype, seed: int = 0):
    """The trunk of HF config `hf` (routed experts excluded) with seeded random weights made on `device`."""
    import torch

    from moeserve.models.config import ModelConfig
    from moeserve.models.registry import model_class

    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        router = name.endswith((".gate.weight", ".gate.e_score_correction_bias"))  # float32, as the loader keeps them
        t = torch.empty(meta.shape, dtype=torch.float32 if router else dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=gen)
        state[name] = t
    model.load_state_dict(state, assign=True, strict=True)
    return model.requires_grad_(False).eval()


def trunk_tokens_per_s(args, model, backend, device) -> float:
    """Output tokens/s of the engine over `model` with `backend` as its experts (random prompts, no eos)."""
    import torch

    from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

    model.set_expert_backend(backend)
    cfg = EngineConfig(device=str(device), dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                       num_kv_blocks=args.requests * 8, block_size=16, max_num_seqs=args.requests, load_experts=False)
    engine = LLMEngine(cfg, model)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(args.requests)]
    engine.generate_batch(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    best = 0.0
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        outs = engine.generate_batch(prompts, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
        sync(device)
        best = max(best, sum(len(o.new_token_ids) for o in outs) / (time.perf_counter() - start))
    return best


def table(res: dict, spec: dict, tokens: list[int]) -> str:
    L = len(spec["moe_layers"])
    per = res["per_layer_s"]
    lines = ["| tokens T | experts touched | fused µs/layer | local µs/layer | ray µs/layer | gloo µs/layer | "
             "ray − local µs | gloo − local µs | limit µs/layer | MoE-path tok/s local | ray | gloo |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in tokens:
        f, lo, r, g = (per[name][t] * 1e6 for name in ("fused", "local", "ray", "gloo"))
        lines.append(f"| {t} | {res['touched_experts'][t]} | {f:.0f} | {lo:.0f} | {r:.0f} | {g:.0f} | {r - lo:.0f} | "
                     f"{g - lo:.0f} | {res['limit_s'][t] * 1e6:.1f} | {t / (L * lo * 1e-6):.0f} | "
                     f"{t / (L * r * 1e-6):.0f} | {t / (L * g * 1e-6):.0f} |")
    lines.append(f"\nempty Ray actor call round trip: {res['empty_call_s'] * 1e6:.0f} µs; memory bandwidth measured: "
                 f"{res['bandwidth_Bps'] / 1e9:.0f} GB/s; MoE layers: {L}")
    probe = res["probe"]
    graph = (f"{probe['compiled_graph_s'] * 1e6:.0f} µs as one Ray Compiled Graph execution"
             if "compiled_graph_s" in probe else f"compiled graph unavailable ({probe['compiled_graph_error']})")
    lines.append(f"echo of {probe['tokens']} tokens' rows to {spec['groups']} actors: {probe['tasks_s'] * 1e6:.0f} µs as "
                 f"actor tasks, {graph}")
    if "engine_tokens_per_s" in res:
        e = res["engine_tokens_per_s"]
        lines.append(f"engine end to end (output tokens/s): in-process experts {e['local']:.0f}, "
                     f"{spec['groups']} Ray expert groups over ray {e['ray']:.0f}, over gloo {e['gloo']:.0f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="one GPU, random DeepSeek-V2-Lite-shaped experts in bf16")
    p.add_argument("--groups", type=int, default=2, help="expert groups (default 2)")
    p.add_argument("--layers", type=int, default=V2_LITE["layers"], help="--gpu: decoder layers (default 27; the first is dense)")
    p.add_argument("--tokens", default=None, help="decode batch sizes (default 1,8,32,128 on GPU; 1,8,32 on CPU)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed steps per run, best of 5 runs per batch size (default 20 GPU, 10 CPU)")
    p.add_argument("--requests", type=int, default=16, help="engine run: concurrent requests (default 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="engine run: tokens per request (default 32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads here and in the groups (default: 1 on CPU, so that a shared "
                        "machine's other work does not stall OpenMP barriers; torch's default on GPU)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."), help="where bench_transport.json goes ($OUT or .)")
    args = p.parse_args()
    if args.groups < 1:
        p.error(f"--groups: must be >= 1, got {args.groups}")
    if not V2_LITE["first_dense"] < args.layers <= 64:
        p.error(f"--layers: must be in {V2_LITE['first_dense'] + 1}..64, got {args.layers}")
    importable()
    import torch

    from moeserve.experts.weights import CheckpointWeights, RandomWeights

    args.tokens = [int(t) for t in (args.tokens or ("1,8,32,128" if args.gpu else "1,8,32")).split(",")]
    args.iters = args.iters or (20 if args.gpu else 10)
    args.engine = not args.gpu
    if args.threads is not None or not args.gpu:
        torch.set_num_threads(args.threads or 1)
    if args.gpu:
        if not torch.cuda.is_available():
            p.error("--gpu: no CUDA device here")
        device, dtype = torch.device("cuda"), torch.bfloat16
        layers = tuple(range(V2_LITE["first_dense"], args.layers))
        from moeserve.models.demo_presets import PRESETS

        hf = dict(PRESETS["deepseek-v2-lite"], num_hidden_layers=args.layers)
        spec = dict(V2_LITE, moe_layers=layers, groups=args.groups, hf=hf,
                    model=f"random DeepSeek-V2-Lite-shaped model (bf16, {args.layers} layers)")
        source = RandomWeights(layers, V2_LITE["hidden"], V2_LITE["inter"], V2_LITE["experts"], dtype="bfloat16")
    else:
        from moeserve.models.config import ModelConfig
        from moeserve.models.demo import ensure_demo_model

        path = ensure_demo_model()
        cfg = ModelConfig.from_dir(path)
        device, dtype = torch.device("cpu"), torch.float32
        spec = dict(hidden=cfg.hidden_size, inter=cfg.moe.moe_intermediate_size, experts=cfg.moe.n_routed_experts,
                    topk=cfg.moe.num_experts_per_tok, moe_layers=tuple(cfg.moe.moe_layer_ids), groups=args.groups,
                    model="the demo model (float32)")
        source = CheckpointWeights(str(path), dtype="float32")
    res = measure(args, source, spec, device, dtype)
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"## {spec['model']}, {args.groups} expert groups, {where}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(table(res, spec, args.tokens))
    out = Path(args.out_dir) / "bench_transport.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items() if k != "hf"},
                               "device": where, **res}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
