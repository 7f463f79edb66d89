"""moeserve over gRPC vs HF transformers `generate`, on random-weight models of real MoE shapes (one GPU).

For each model (DeepSeek-V2-Lite and Qwen3-30B-A3B shapes), in one run:
  1. floor: the decode-step floor, active weight bytes (dense part + the experts a step touches) and
     KV bytes over the HBM bandwidth measured with a large device-to-device copy;
  2. moeserve: a server process builds the model with random bf16 weights directly on the GPU from a
     seed and serves it; `router.bench` drives it over gRPC at concurrency 1, 16 and 64 with 256-token
     prompts and 64 new tokens (ignore_eos, so every request produces exactly 64);
  3. HF: the server is stopped (GPU memory back), then transformers builds the same shape with random
     bf16 weights (grouped_mm experts where supported) and runs `generate` at batch 1, 16 and 64.
It prints a table and writes bench_serving.json (rewritten after every phase, so a run cut short
still leaves what it measured) into --out-dir (default $OUT, else the current directory), with two
traces per model: trace_<model>_server.json (every engine step: start, ms, tokens, whether it replayed graphs;
and when Triton compiled a kernel) and trace_<model>_client.json (every request: sent, TTFT), and the server's
log, server_<model>.log.

Why weights are built on the GPU instead of written as checkpoints: the Qwen3-30B-A3B shape is
~61 GB in bf16 and the benchmark machine has 64 GiB of disk; writing and reading it back would take
longer than the benchmark itself and leave no room. Random weights from a seed give the same shapes,
the same bytes moved and the same (roughly uniform) expert routing that the timings depend on.

    python3 benchmarks/bench_serving.py                       # both models, the full run
    bash benchmarks/device_run.sh                             # with the GPU tests and profile_engine, one call
    python3 benchmarks/bench_serving.py --models qwen3-30b-a3b --concurrency 1,16
    python3 benchmarks/bench_serving.py --smoke               # tiny model on CPU: checks the script
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("cluster", "experts", "router", "kernels", "models", "chaos")

BENCH_MODELS = ("deepseek-v2-lite", "qwen3-30b-a3b")  # shapes from moeserve.models.demo_presets
# --smoke: a tiny model that runs everywhere, to check this script end to end on a CPU
TINY = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=512, hidden_size=64,
    intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
    bos_token_id=None, eos_token_id=None,
)


def preset(name: str) -> dict:
    """HF config.json contents of a benchmark model (the released config; weights are random)."""
    if name == "tiny":
        return dict(TINY)
    from moeserve.models.demo_presets import PRESETS

    return dict(PRESETS[name])


# issue 3's reference: HF generate on an H100 (random bf16 weights, grouped_mm experts), output tok/s
HF_REFERENCE = {"deepseek-v2-lite": {1: 7.6, 16: 146, 64: 281}, "qwen3-30b-a3b": {1: 6.1, 16: 102, 64: 241}}


# -- making `moeserve` importable without installing it (the GPU machine has no build tools for it) --

def ensure_importable() -> dict[str, str]:
    """Import moeserve from this checkout (a namespace of symlinks if it is not installed); returns env."""
    env = dict(os.environ)
    try:
        import moeserve.router  # noqa: F401
    except ImportError:
        ns = Path(os.environ.get("TMPDIR", "/tmp")) / "moeserve_ns"
        pkg = ns / "moeserve"
        pkg.mkdir(parents=True, exist_ok=True)
        for name, target in [(f, ROOT / f) for f in CODE_FOLDERS] + [("v1", ROOT / "protos" / "moeserve" / "v1")]:
            link = pkg / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        sys.path.insert(0, str(ns))
        env["PYTHONPATH"] = os.pathsep.join([str(ns), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ensure_stubs()
    return env


STUBS = ROOT / "protos" / "moeserve" / "v1" / "inference_pb2.py"


def ensure_stubs() -> None:
    """Make `moeserve.v1.inference_pb2` importable under whatever protobuf this machine has.

    The generated module refuses a protobuf runtime older than the protoc that made it; its
    embedded file descriptor is portable, so on that refusal the messages are built from it directly.
    """
    try:
        import moeserve.v1.inference_pb2  # noqa: F401
        return
    except ImportError as exc:
        if not STUBS.exists():
            raise SystemExit("generated stubs missing: build them (pip install -e . or make setup) and carry "
                             "protos/moeserve/v1/inference_pb2.py to this machine") from exc
        reason = exc
    except Exception as exc:  # google.protobuf.runtime_version.VersionError
        reason = exc
    import ast
    import re
    import types

    from google.protobuf import descriptor_pool
    from google.protobuf.internal import builder

    found = re.search(r"AddSerializedFile\((b'.*?')\)\n", STUBS.read_text(), re.S)
    if found is None:
        raise SystemExit(f"{STUBS} holds no serialized descriptor; regenerate it") from reason
    name = "moeserve.v1.inference_pb2"
    module = types.ModuleType(name)
    module.DESCRIPTOR = descriptor_pool.Default().AddSerializedFile(ast.literal_eval(found.group(1)))
    builder.BuildMessageAndEnumDescriptors(module.DESCRIPTOR, module.__dict__)
    builder.BuildTopDescriptorsAndMessages(module.DESCRIPTOR, name, module.__dict__)
    sys.modules[name] = module
    import moeserve.v1

    moeserve.v1.inference_pb2 = module
    print(f"note: stubs built from their descriptor ({type(reason).__name__}: {reason})", flush=True)


# -- the decode-step floor ------------------------------------------------------------------------------

def measure_bandwidth(device: str, gib: float = 4.0, iters: int = 10) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    elapsed = time.perf_counter() - t
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the server process and HF need this memory back
    return 2 * n * 2 * iters / elapsed


def weight_bytes(hf: dict, dtype_bytes: int) -> dict:
    """Bytes of the dense part a decode step reads (no embedding table) and of one routed expert."""
    import torch

    from moeserve.models.config import ModelConfig
    from moeserve.models.registry import model_class

    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    dense = sum(p.numel() for n, p in model.state_dict().items() if "embed_tokens" not in n)
    kv_per_token = model.kv_cache_bytes_per_token(torch.bfloat16) * dtype_bytes // 2
    return dict(
        dense_bytes=dense * dtype_bytes,
        expert_bytes=3 * cfg.hidden_size * cfg.moe.moe_intermediate_size * dtype_bytes,
        num_experts=cfg.moe.n_routed_experts, top_k=cfg.moe.num_experts_per_tok,
        moe_layers=len(cfg.moe.moe_layer_ids), kv_bytes_per_token=kv_per_token,
    )


def decode_floor(w: dict, batch: int, context: int, bandwidth: float) -> dict:
    """Fastest possible decode step at `batch`: bytes it must read / bandwidth (uniform routing assumed)."""
    e, k = w["num_experts"], w["top_k"]
    experts_touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer
    weights = w["dense_bytes"] + w["moe_layers"] * experts_touched * w["expert_bytes"]
    kv = w["kv_bytes_per_token"] * context * batch
    step = (weights + kv) / bandwidth
    return dict(active_weight_bytes=weights, kv_bytes=kv, step_ms=step * 1e3, tok_s=batch / step,
                weights_only_tok_s=batch * bandwidth / weights)


# -- the moeserve server, in its own process ------------------------------------------------------------

def build_random_model(hf: dict, device: str, dtype, seed: int):
    """The moeserve model of config `hf`, random weights made on `device` (no checkpoint)."""
    import torch

    from moeserve.models.config import ModelConfig
    from moeserve.models.local_experts import LocalExperts
    from moeserve.models.registry import model_class

    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(shape, dt, std=0.02):
        return torch.empty(shape, dtype=dt, device=device).normal_(0.0, std, generator=gen)

    state = {}
    for name, meta in model.state_dict().items():
        fp32 = name.endswith((".gate.weight", ".gate.e_score_correction_bias"))
        dt = torch.float32 if fp32 else dtype
        if name.endswith("norm.weight"):
            state[name] = torch.ones(meta.shape, dtype=dt, device=device)
        elif name.endswith(("bias", "e_score_correction_bias")):
            state[name] = torch.zeros(meta.shape, dtype=dt, device=device)
        else:
            state[name] = rand(meta.shape, dt)
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False).eval()
    h, i, e = cfg.hidden_size, cfg.moe.moe_intermediate_size, cfg.moe.n_routed_experts
    experts = {layer: (rand((e, 2 * i, h), dtype), rand((e, h, i), dtype)) for layer in cfg.moe.moe_layer_ids}
    model.set_expert_backend(LocalExperts(experts))
    return model


def add_script_args(p) -> None:
    """The arguments profile_engine.py and routing_spread.py share: which models, where, the seed,
    where results go, and --smoke (a tiny model on CPU: checks the script)."""
    p.add_argument("--models", type=lambda s: s.split(","), default=list(BENCH_MODELS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")


def server_facts(llm) -> dict:
    """What the server runs with, as its engine set it up (not as the bench would guess it): the
    prefill hold in force (the engine holds prompts only where decode steps are graphs), its graphs
    and its KV blocks."""
    return dict(prefill_hold_ms=llm.scheduler.prefill_hold_s * 1e3, prompt_graph_tokens=llm.config.prompt_graph_tokens,
                graphs=llm.runner.describe_graphs() or "decode graphs off", kv_blocks=llm.stats()["kv_blocks_total"], overlap_decode=llm.overlap_decode)


async def _serve_random(args: argparse.Namespace) -> None:
    import torch

    from moeserve.router.config import EngineConfig
    from moeserve.router.engine import AsyncEngine
    from moeserve.router.llm_engine import LLMEngine
    from moeserve.router.server import InferenceServer, ServerConfig

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_random_model(preset(args.preset), args.device, dtype, args.seed)
    config = EngineConfig(device=args.device, dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, max_queued_requests=4096,
                          decode_graphs="off" if args.enforce_eager else "auto", overlap_decode=args.overlap_decode,
                          **({} if args.prefill_hold_ms is None else {"prefill_hold_ms": args.prefill_hold_ms}),
                          **({} if args.prompt_graph_tokens is None else {"prompt_graph_tokens": args.prompt_graph_tokens}),
                          **({} if args.gpu_memory_fraction is None else {"gpu_memory_fraction": args.gpu_memory_fraction}))
    started = time.monotonic()
    llm = LLMEngine(config, model, tokenizer=None)
    trace = StepTrace(llm) if args.step_trace else None
    facts = dict(server_facts(llm), engine_start_s=round(time.monotonic() - started, 1))
    print(f"server: {facts['kv_blocks']} KV blocks of {config.block_size} tokens; {facts['graphs']}; "
          f"decode overlap {'on' if facts['overlap_decode'] else 'off'}; engine started in {facts['engine_start_s']} s "
          "(KV cache, kernel warm-up, graph captures)", file=sys.stderr, flush=True)
    engine = AsyncEngine(llm)
    server = InferenceServer(engine, ServerConfig(port=0, max_streams_per_caller=4096, grace_s=5),
                             model_name=args.preset)
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"READY {server.port} {json.dumps(facts)}", flush=True)
    await stop.wait()
    await server.stop(0)
    if trace is not None:
        trace.dump(Path(args.step_trace))


class StepTrace:
    """The server's every engine step (wall-clock start, seconds, tokens, whether a decode graph ran it),
    when Triton compiled each kernel it compiled (its cache entries' times) and every garbage
    collection of 1 ms or more (start, generation, ms: it holds the GIL), written at exit: what a
    request's TTFT waited for."""

    def __init__(self, llm) -> None:
        import gc

        self.llm, self.steps, self.waits, self.gc_pauses = llm, [], [], []
        self.started = time.time()
        self._graph_steps = self._graphed()
        self._gc_start = 0.0
        llm.observer = self
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_start) * 1e3
        if ms >= 1:
            self.gc_pauses.append([round(time.time() - ms / 1e3, 4), info["generation"], round(ms, 2)])

    def _graphed(self) -> int:
        """Steps run so far through any graph: decode, prompt or chunk (each kind counts its own)."""
        runner = self.llm.runner
        return sum(g.steps for g in (runner.graphs, runner.prompts, runner.chunks) if g is not None)

    def record_step(self, seconds: float, num_tokens: int) -> None:
        n = self._graphed()
        self.steps.append([round(time.time() - seconds, 4), round(seconds * 1e3, 2), num_tokens,
                           n != self._graph_steps])
        self._graph_steps = n

    def record_queue_wait(self, seconds: float) -> None:
        self.waits.append(round(seconds * 1e3, 2))

    def dump(self, path: Path) -> None:
        cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
        compiled = sorted(
            (round(f.stat().st_mtime, 4), f.parent.name[:12], f.name) for f in cache.glob("*/*.json")
            if not f.name.startswith("__grp__") and f.stat().st_mtime >= self.started)
        path.write_text(json.dumps(dict(steps_fields=["start", "ms", "tokens", "graphed"], steps=self.steps,
                                        queue_wait_ms=self.waits, triton_compiles=compiled,
                                        gc_pauses_fields=["start", "generation", "ms"], gc_pauses=self.gc_pauses)))


def start_server(name: str, args: argparse.Namespace, env: dict) -> tuple[subprocess.Popen, int, dict]:
    """The server process, its port, and server_facts() as it reported them."""
    cmd = [sys.executable, __file__, "_serve", "--preset", name, "--device", args.device,
           "--seed", str(args.seed), "--max-num-seqs", str(max(args.concurrency)),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-model-len", str(args.max_model_len)] + (["--enforce-eager"] if args.enforce_eager else [])
    if args.prefill_hold_ms is not None:
        cmd += ["--prefill-hold-ms", str(args.prefill_hold_ms)]
    if args.prompt_graph_tokens is not None:
        cmd += ["--prompt-graph-tokens", str(args.prompt_graph_tokens)]
    if args.gpu_memory_fraction is not None:
        cmd += ["--gpu-memory-fraction", str(args.gpu_memory_fraction)]
    if not args.overlap_decode:
        cmd += ["--no-overlap-decode"]
    if args.out_dir_path is not None:
        cmd += ["--step-trace", str(args.out_dir_path / f"trace_{name}_server.json")]
    log_path = None if args.out_dir_path is None else args.out_dir_path / f"server_{name}.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if log_path is None else subprocess.PIPE,
                            text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def keep_log() -> None:  # the server's log as it runs, and in the out dir (capture refusals, warnings)
        with open(log_path, "w") as log:
            for line in proc.stderr:
                sys.stderr.write(line)
                log.write(line)
                log.flush()

    if log_path is not None:
        threading.Thread(target=keep_log, daemon=True).start()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + args.server_start_timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise SystemExit(f"the {name} server did not get ready in {args.server_start_timeout} s")
        if line is None:
            raise SystemExit(f"the {name} server exited ({proc.wait()}) before it was ready")
        if line.startswith("READY "):
            _, port, facts = line.split(" ", 2)
            return proc, int(port), json.loads(facts)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def level_workloads(c: int, n: int, args: argparse.Namespace, limits: dict) -> tuple[list, list]:
    """The n measured requests of the level of concurrency c, and its warm-up wave (c requests of 4 new
    tokens: kernel compiles, the allocator). Each level draws prompts of its own: with one seed for all, a
    level's first prompts were the level before's, whose KV the prefix cache still held, and its first wave
    read them as 16-token chunks after a cached prefix, steps unlike the rest (Qwen3 on an H100: 8 such
    chunks beside 8 new prompts at 16, a step of 32 such chunks at 64, 124-183 ms; docs/benchmarks.md)."""
    from moeserve.router import bench

    prompt, out = bench.Distribution("fixed", args.prompt_len), bench.Distribution("fixed", args.output_len)
    level_seed = args.seed + 1000 * c
    items, _ = bench.make_workload(n, prompt, out, seed=level_seed, **limits)
    warm, _ = bench.make_workload(c, prompt, bench.Distribution("fixed", 4), seed=level_seed + 1, **limits)
    return items, warm


async def drive_server(port: int, name: str, args: argparse.Namespace) -> dict[int, dict]:
    from moeserve.router import bench
    from moeserve.router.client import AsyncClient

    prompt, out = bench.Distribution("fixed", args.prompt_len), bench.Distribution("fixed", args.output_len)
    vocab = preset(name)["vocab_size"]
    limits = dict(vocab_size=vocab, context_length=args.max_model_len,
                  max_prompt_tokens=args.max_model_len - 1, max_tokens_limit=args.max_model_len - 1)
    results, requests = {}, {}
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        await client.wait_ready(60)
        for c in args.concurrency:
            n = max(args.min_requests, args.waves * c)
            items, warm = level_workloads(c, n, args, limits)
            await bench.run(client, warm, bench.BenchConfig(num_requests=c, prompt_len=prompt, output_len=out,
                                                            concurrency=c))
            cfg = bench.BenchConfig(num_requests=n, prompt_len=prompt, output_len=out, concurrency=c, seed=args.seed)
            started = time.time()
            res = await bench.run(client, items, cfg)
            requests[c] = dict(started=started, requests=res.pop("requests"))
            results[c] = res["summary"]
            s = res["summary"]
            print(f"  moeserve {name} concurrency {c}: {s['output_token_throughput']:.1f} tok/s "
                  f"(TTFT p50 {s['ttft_ms']['p50']:.0f} ms, TPOT p50 {s['tpot_ms']['p50']:.1f} ms, "
                  f"{s['failed']} failed)", flush=True)
        for rate in args.rates:  # open loop: Poisson arrivals, capped at the largest batch the engine runs
            n = max(args.min_requests, int(rate * args.rate_seconds))
            items, _ = bench.make_workload(n, prompt, out, seed=args.seed + 2, **limits)
            cfg = bench.BenchConfig(num_requests=n, prompt_len=prompt, output_len=out, rate=rate,
                                    concurrency=max(args.concurrency), seed=args.seed)
            res = await bench.run(client, items, cfg)
            s = results[f"rate{rate:g}"] = res["summary"]
            print(f"  moeserve {name} Poisson {rate:g} req/s: {s['output_token_throughput']:.1f} tok/s "
                  f"(TTFT p50/p99 {s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms, "
                  f"TPOT p50/p99 {s['tpot_ms']['p50']:.1f}/{s['tpot_ms']['p99']:.1f} ms, {s['failed']} failed)",
                  flush=True)
    if args.out_dir_path is not None:  # per request: when it was sent, its TTFT (client and server side)
        (args.out_dir_path / f"trace_{name}_client.json").write_text(json.dumps(requests))
    return results


# -- HF transformers generate ---------------------------------------------------------------------------

def run_hf(name: str, args: argparse.Namespace) -> dict[int, dict]:
    import torch
    import transformers

    hf = preset(name)
    model_type = hf.pop("model_type")
    hf.pop("architectures")
    hf.pop("rope_scaling", None)  # YaRN changes no shape and no timing; spares older transformers its parsing
    config = transformers.AutoConfig.for_model(model_type, **hf)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    kwargs = dict(dtype=dtype)
    if args.device.startswith("cuda"):
        kwargs["experts_implementation"] = "grouped_mm"
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        except (TypeError, ValueError) as exc:  # an older transformers without grouped_mm experts
            print(f"  HF: {exc}; using the default experts implementation", flush=True)
            kwargs.pop("experts_implementation", None)
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    model.eval()
    impl = getattr(model.config, "_experts_implementation", None)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    results = {}
    for b in args.concurrency:
        ids = torch.randint(0, config.vocab_size, (b, args.prompt_len), generator=gen).to(args.device)
        mask = torch.ones_like(ids)
        common = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **common)  # warm-up
            _sync(args.device)
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len, **common)
            _sync(args.device)
            elapsed = time.perf_counter() - t
        new = (out.shape[1] - args.prompt_len) * b
        results[b] = dict(output_token_throughput=new / elapsed, seconds=elapsed, new_tokens=new,
                          experts_implementation=impl)
        print(f"  HF {name} batch {b}: {new / elapsed:.1f} tok/s ({elapsed:.1f} s)", flush=True)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- the run --------------------------------------------------------------------------------------------

def synchronising_calls(run, packages: tuple[str, ...] = ()) -> dict[str, int]:
    """Run `run()` under torch's CUDA sync debug mode: each call that made the host wait for the GPU, keyed by
    where it came from (the innermost line of this checkout outside benchmarks/, or of a package whose path
    holds one of `packages`, e.g. "/xgrammar/") and its message, with how often."""
    import warnings

    import torch

    found: dict[str, int] = {}
    repo = os.path.realpath(Path(__file__).resolve().parent.parent)

    def where(message, category, filename, lineno, file=None, line=None) -> None:
        ours = [f for f in traceback.extract_stack()[:-1] if "benchmarks" not in f.filename and (
            os.path.realpath(f.filename).startswith(repo) or any(p in f.filename for p in packages))]
        at = f"{ours[-1].filename}:{ours[-1].lineno} ({ours[-1].line})" if ours else f"{filename}:{lineno}"
        key = f"{at}: {str(message)[:60]}"
        found[key] = found.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = where
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def table(report: dict) -> str:
    rows = ["| model | batch | moeserve tok/s | HF tok/s | ratio | vs issue's HF ref (target 10x) | "
            "floor tok/s (weights+KV) | step floor ms | TTFT p50 ms | TPOT p50 ms |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        for b in report["concurrency"]:
            ours = r.get("moeserve", {}).get(str(b), {})
            hf = r.get("hf", {}).get(str(b), {})
            fl = r.get("floor", {}).get(str(b), {})
            o, h = ours.get("output_token_throughput"), hf.get("output_token_throughput")
            fmt = lambda v, f=".1f": "-" if v is None else format(v, f)  # noqa: E731
            ref = HF_REFERENCE.get(name, {}).get(b)
            rows.append(f"| {name} | {b} | {fmt(o)} | {fmt(h)} | {fmt(o / h if o and h else None, '.2f')} | "
                        f"{fmt(o / ref if o and ref else None, '.1f')} | {fmt(fl.get('tok_s'), '.0f')} | {fmt(fl.get('step_ms'), '.2f')} | "
                        f"{fmt((ours.get('ttft_ms') or {}).get('p50'), '.0f')} | "
                        f"{fmt((ours.get('tpot_ms') or {}).get('p50'), '.1f')} |")
    return "\n".join(rows)


@contextlib.contextmanager
def _phase(record: dict, name: str):
    """Run one phase; a failure is printed and recorded under "<name>_error", and the run goes on."""
    try:
        yield
    except (Exception, SystemExit) as exc:  # one GPU run is precious: keep what the other phases measure
        traceback.print_exc()
        record[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  {name} failed: {exc}", flush=True)


def markdown(report: dict) -> str:
    """The section docs/benchmarks.md takes from one run: setup, the table, the failures if any."""
    lines = [f"## moeserve vs HF transformers generate on {report['device']}", "",
             f"torch {report['torch']}; random bf16 weights; {report['prompt_len']}-token prompts, "
             f"{report['output_len']} new tokens (ignore_eos); moeserve over gRPC at fixed concurrency "
             f"(decode steps: {report.get('decode', 'eager')}), HF "
             f"`generate` at the same batch size; measured copy bandwidth {report.get('hbm_bandwidth_gbs', 0):.0f} GB/s. "
             "The floor is the fastest decode step the bandwidth allows: active weight bytes (dense part plus "
             "the experts a step touches, uniform routing) and KV bytes, over the measured bandwidth.", "",
             table(report), ""]
    poisson = [(name, key[4:], v) for name, r in report["models"].items()
               for key, v in r.get("moeserve", {}).items() if key.startswith("rate")]
    if poisson:
        hold = report.get("prefill_hold_ms")
        held = "" if hold is None else f"; prefill hold {hold:g} ms"
        lines += [f"Open loop (Poisson arrivals{held}):", "", "| model | req/s | output tok/s | TTFT p50 / p99 ms | "
                  "TPOT p50 / p99 ms | failed |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {rate} | {v['output_token_throughput']:.1f} | {v['ttft_ms']['p50']:.0f} / "
                  f"{v['ttft_ms']['p99']:.0f} | {v['tpot_ms']['p50']:.1f} / {v['tpot_ms']['p99']:.1f} | {v['failed']} |"
                  for name, rate, v in poisson] + [""]
    for name, r in report["models"].items():
        facts = r.get("server") or {}
        if "engine_start_s" in facts:
            lines.append(f"- {name} server: {facts['graphs']}; engine started in {facts['engine_start_s']} s")
        lines += [f"- {name} {phase}: {r[phase]}" for phase in ("moeserve_error", "hf_error") if phase in r]
    return "\n".join(lines) + "\n"


def main_bench(args: argparse.Namespace) -> int:
    env = ensure_importable()
    import torch

    out_dir = Path(args.out_dir or os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir_path = out_dir.resolve()
    out_file = out_dir / "bench_serving.json"
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    # prefill_hold_ms: as the server reports it once started (server_facts)
    report = dict(device=device_name, torch=torch.__version__, prompt_len=args.prompt_len,
                  output_len=args.output_len, concurrency=args.concurrency, models={},
                  decode="eager" if args.enforce_eager else "CUDA graphs", prefill_hold_ms=None,
                  hf_reference_h100=HF_REFERENCE)

    def save() -> None:
        out_file.write_text(json.dumps(report, indent=2))

    bw = measure_bandwidth(args.device, gib=args.bandwidth_gib)
    report["hbm_bandwidth_gbs"] = bw / 1e9
    print(f"device {device_name}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    context = args.prompt_len + args.output_len // 2  # mean context over the decode steps
    for name in args.models:
        r = report["models"][name] = {}
        w = weight_bytes(preset(name), 2 if args.device.startswith("cuda") else 4)
        r["weights"] = w
        r["floor"] = {str(b): decode_floor(w, b, context, bw) for b in args.concurrency}
        save()
        if not args.skip_moeserve:
            print(f"{name}: moeserve", flush=True)
            with _phase(r, "moeserve"):
                proc, port, r["server"] = start_server(name, args, env)
                report["prefill_hold_ms"] = r["server"]["prefill_hold_ms"]
                save()
                try:
                    r["moeserve"] = {str(k): v for k, v in asyncio.run(drive_server(port, name, args)).items()}
                finally:
                    stop_server(proc)
            save()
        if not args.skip_hf:
            print(f"{name}: HF transformers generate", flush=True)
            with _phase(r, "hf"):
                r["hf"] = {str(k): v for k, v in run_hf(name, args).items()}
            save()
    print(table(report))
    (out_dir / "benchmarks.md").write_text(markdown(report))
    print(f"results in {out_file}; the table for docs/benchmarks.md in {out_dir / 'benchmarks.md'}")
    return 1 if any(k.endswith("_error") for r in report["models"].values() for k in r) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "_serve"], help=argparse.SUPPRESS)
    p.add_argument("--models", type=lambda s: s.split(","), default=list(BENCH_MODELS))
    p.add_argument("--concurrency", type=ints, default=[1, 16, 64], help="batch sizes / concurrency levels")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",") if x], default=[],
                   help="also run open-loop Poisson arrivals at these requests/s (default: none)")
    p.add_argument("--rate-seconds", type=float, default=20.0, help="how long each Poisson run sends (default 20)")
    p.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency (default 2)")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--bandwidth-gib", type=float, default=4.0)
    p.add_argument("--server-start-timeout", type=float, default=600.0)
    p.add_argument("--skip-moeserve", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, small numbers: checks the script")
    p.add_argument("--enforce-eager", action="store_true",
                   help="moeserve decodes without CUDA graphs (as `moeserve serve --enforce-eager`)")
    p.add_argument("--prefill-hold-ms", type=float, default=None,
                   help="the server's EngineConfig.prefill_hold_ms (as `moeserve serve --prefill-hold-ms`; default: its default)")
    p.add_argument("--prompt-graph-tokens", type=int, default=None,
                   help="the server's EngineConfig.prompt_graph_tokens (as `moeserve serve --prompt-graph-tokens`; "
                        "default: its default)")
    p.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="the server's EngineConfig.gpu_memory_fraction (as `moeserve serve --gpu-memory-fraction`; "
                        "default: its default)")
    p.add_argument("--no-overlap-decode", dest="overlap_decode", action="store_false",
                   help="the server waits for each decode step's tokens before queuing the next (as `moeserve serve "
                        "--no-overlap-decode`)")
    # _serve (the server process)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--step-trace", default=None, help="write the server's step trace here at exit")
    args = p.parse_args(argv)
    args.out_dir_path = None  # main_bench sets it: where the trace files go
    if args.smoke:
        args.models, args.device, args.concurrency = ["tiny"], "cpu", [1, 2]
        args.prompt_len, args.output_len, args.max_model_len, args.min_requests = 16, 8, 64, 2
        args.bandwidth_gib, args.max_num_batched_tokens = 0.05, 256
        args.rates, args.rate_seconds = [50.0], 0.1
    unknown = [m for m in args.models if m not in (*BENCH_MODELS, "tiny")]
    if unknown:
        p.error(f"unknown model {unknown}; choose from {BENCH_MODELS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "_serve":
        ensure_importable()
        asyncio.run(_serve_random(args))
        return 0
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
