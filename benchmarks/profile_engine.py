"""Where an engine step's time goes, in-process (no gRPC): prefill and decode step times, eager vs
CUDA graphs, and the top kernels of each kind of step from torch.profiler.

Same random-weight models as bench_serving.py. For each model and batch size B: B requests of
--prompt-len random tokens are added at once; the prefill steps are timed one by one, then --decode-steps
pure decode steps with CUDA graphs, then as many eagerly, each run back to back (their mean). One profiled eager decode step at the largest
batch and one profiled prefill step give the kernel tables. Writes profile_engine.json and
profile_engine.txt into --out-dir (default $OUT, else .).

The tables' kernel times are not kernel costs where kernels launch with PDL (kernels/pdl.py, on by default
on Hopper): such a kernel is put on the GPU while the one before it runs and waits inside, and the profiler
counts the wait as its time (the softmax top-k showed 53 us a layer in a 4096-token step and takes 7.9 us
alone, docs/benchmarks.md). For what each kernel costs, time it alone (the bench_*.py scripts) or run this
with MOESERVE_PDL=0, which launches every kernel plainly.

    python3 benchmarks/profile_engine.py --models deepseek-v2-lite --batches 1,16,64
    python3 benchmarks/profile_engine.py --smoke        # tiny model on CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving as bs  # noqa: E402  (same folder: presets, random models, import shim)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fill(engine, batch: int, prompt_len: int, max_tokens: int, seed: int, tag: str) -> None:
    import torch

    from moeserve.router.sequence import SamplingParams

    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _drain(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def _timed_steps(engine, n: int, device: str) -> list[float]:
    times = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _steady_steps(engine, n: int, device: str) -> list[float]:
    """n steps run back to back, as a server runs them, with one sync before and one after: [mean ms
    per step]. Timing each step between syncs would hide the GPU time of a decode step that the engine
    queued ahead (LLMEngine's look-ahead) outside the timed span."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        engine.step()
    _sync(device)
    return [(time.perf_counter() - t) * 1e3 / n]


def _kernel_table(prof, rows: int) -> str:
    sort = "self_cuda_time_total" if any(e.device_type.name == "CUDA" for e in prof.events()) else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def _mixed_step(engine, b: int, args: argparse.Namespace, tag: str, run, prompt_len: int | None = None) -> object:
    """b - 1 sequences decoding and one new prompt: the step that reads the prompt beside the decodes
    (eager; a closed-loop client's late request makes one each wave) is run by `run`; then drained."""
    _fill(engine, b - 1, args.prompt_len, 8, args.seed + 5, tag)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.requests.values()):
        engine.step()
    _fill(engine, 1, prompt_len or args.prompt_len, 2, args.seed + 6, tag + "x")
    _sync(args.device)
    result = run()
    _drain(engine)
    return result


def _mixed_steps(engine, b: int, args, activities, r: dict, text: list[str], name: str) -> None:
    """Time mixed steps, profile one (by GPU time and by CPU time), and list where it waits for the GPU
    (torch's CUDA sync debug mode: each synchronising call, with the moeserve line that made it)."""
    import torch
    from torch.profiler import profile

    times = [_mixed_step(engine, b, args, f"x{i}-", lambda: _timed_steps(engine, 1, args.device)[0])
             for i in range(3)]
    # every mixed step of a server has a shape of its own (the prompt's length, its context): a new
    # prompt length each time, as the engine runs them (cuDNN's attention off) and with it on
    new_shapes = {}
    for label, cudnn in (("moeserve", False), ("cuDNN attention on", True)):
        def timed(cudnn=cudnn):
            was = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            try:
                return _timed_steps(engine, 1, args.device)[0]
            finally:
                torch.backends.cuda.enable_cudnn_sdp(was)
        first = 5 if cudnn else 1  # lengths neither run saw before
        lens = [args.prompt_len - max(1, args.prompt_len // 32) * i for i in range(first, first + 4)]
        new_shapes[label] = [round(_mixed_step(engine, b, args, f"n{cudnn}{n}-", timed, n), 1) for n in lens]
    r["mixed_step_new_shape_ms"] = new_shapes

    def profiled():
        with profile(activities=activities) as prof:
            _timed_steps(engine, 1, args.device)
        return prof

    prof = _mixed_step(engine, b, args, "xp-", profiled)
    gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    r["mixed_step_ms"], r["mixed_step_gpu_ms"] = times, gpu_ms
    text += [f"== {name}: one mixed step ({b - 1} decodes + one {args.prompt_len}-token prompt); "
             f"{sorted(times)[1]:.1f} ms (median of 3), GPU busy {gpu_ms:.1f} ms", _kernel_table(prof, args.rows),
             f"== {name}: the same step by CPU time",
             prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60)]
    syncs: dict[str, int] = {}
    if args.device.startswith("cuda"):
        _mixed_step(engine, b, args, "xs-", lambda: syncs.update(bs.synchronising_calls(engine.step)))
    r["mixed_step_syncs"] = syncs
    text += [f"== {name}: synchronising calls in one mixed step ({sum(syncs.values())})"] + \
        [f"{n:5d}  {k}" for k, n in sorted(syncs.items(), key=lambda kv: -kv[1])]
    print(f"{name}: mixed step {[round(t, 1) for t in times]} ms, a new shape each {new_shapes}, GPU busy {gpu_ms:.1f} ms, "
          f"{sum(syncs.values())} synchronising calls", flush=True)


def profile_model(name: str, args: argparse.Namespace, report: dict, text: list[str]) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moeserve.router.config import EngineConfig
    from moeserve.router.llm_engine import LLMEngine

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = bs.build_random_model(bs.preset(name), args.device, dtype, args.seed)
    config = EngineConfig(device=args.device, dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                          max_num_seqs=max(args.batches), max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len,
                          decode_graphs="auto" if args.device.startswith("cuda") else "padded")
    engine = LLMEngine(config, model, tokenizer=None)
    graphs = engine.runner.graphs
    print(f"{name}: {engine.stats()['kv_blocks_total']} KV blocks of {config.block_size} tokens", flush=True)
    r = report[name] = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    for b in args.batches:
        steps = args.decode_steps
        # warm-up wave (compiles, graph capture at this batch), then the measured wave
        _fill(engine, b, args.prompt_len, 2 * steps + 8, args.seed + 1, f"w{b}-")
        _drain(engine)
        _fill(engine, b, args.prompt_len, 2 * steps + 8, args.seed, f"m{b}-")
        prefill = []
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.requests.values()):
            prefill += _timed_steps(engine, 1, args.device)
        _timed_steps(engine, 2, args.device)
        with_graphs = _steady_steps(engine, steps, args.device)
        saved, engine.runner.graphs = engine.runner.graphs, None
        eager = _steady_steps(engine, steps, args.device)
        if b == max(args.batches):
            with profile(activities=activities) as prof:
                _timed_steps(engine, 1, args.device)
            text += [f"== {name}: one eager decode step at batch {b}", _kernel_table(prof, args.rows)]
            engine.runner.graphs = saved
            with profile(activities=activities) as prof:
                _timed_steps(engine, 1, args.device)
            text += [f"== {name}: one CUDA-graph decode step at batch {b}", _kernel_table(prof, 12)]
        engine.runner.graphs = saved
        _drain(engine)
        med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
        r[str(b)] = dict(preemptions_so_far=engine.stats()["preemptions"], prefill_steps_ms=prefill, decode_graph_ms=med(with_graphs), decode_eager_ms=med(eager),
                         decode_graph_tok_s=b / med(with_graphs) * 1e3, decode_eager_tok_s=b / med(eager) * 1e3)
        print(f"{name} batch {b}: prefill steps {[round(x, 1) for x in prefill]} ms; decode step "
              f"{med(with_graphs):.2f} ms with graphs, {med(eager):.2f} ms eager (mean of {steps} back to back)",
              flush=True)
    b = max(args.batches)
    if b > 1:
        _mixed_steps(engine, b, args, activities, r, text, name)
    # one profiled prefill step at the largest batch

    _fill(engine, b, args.prompt_len, 2, args.seed + 3, "p-")
    with profile(activities=activities) as prof:
        _timed_steps(engine, 1, args.device)
    text += [f"== {name}: one prefill step ({b} x {args.prompt_len} tokens, token budget "
             f"{args.max_num_batched_tokens})", _kernel_table(prof, args.rows)]
    _drain(engine)
    r["graphs"] = engine.runner.describe_graphs() or "off"
    r["engine"] = engine.stats()
    del engine, model, graphs  # the graphs hold the model: all three go before the next model is built
    import gc

    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs.add_script_args(p)
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",") if x], default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--rows", type=int, default=25, help="kernels per profiler table")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.device, args.batches, args.prompt_len, args.decode_steps = ["tiny"], "cpu", [1, 2], 8, 3
        args.max_model_len, args.rows = 64, 5
    bs.ensure_importable()
    out = Path(args.out_dir or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    text: list[str] = []
    for name in args.models:
        try:
            profile_model(name, args, report, text)
        except Exception as exc:  # noqa: BLE001 -- keep the other model's figures
            import traceback

            traceback.print_exc()
            report[name] = dict(report.get(name, {}), error=f"{type(exc).__name__}: {exc}")
        (out / "profile_engine.json").write_text(json.dumps(report, indent=2))
        (out / "profile_engine.txt").write_text("\n".join(text))
    return 1 if any("error" in r for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
