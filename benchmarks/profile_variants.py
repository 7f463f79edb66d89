"""Launch choices timed inside whole engine steps: benchmarks/profile_engine.py's graphed decode step and
prompt step times under named variants of moeserve.kernels constants, each variant in a process of its
own (its kernels compile for its settings), the variants taking turns for --rounds rounds on one machine.

A choice that wins alone (bench_*.py) does not always win in a decode step, where launches overlap through
PDL and the caches hold what the step before left (docs/benchmarks.md has several such cases), so the
constants that switch such choices stay off until a run of this says otherwise.

    python3 benchmarks/profile_variants.py --models qwen3-30b-a3b --batches 16,64 --rounds 2 \\
        --variant base= --variant merge=decode_attention.FUSED_MERGE=True \\
        --variant norm=ops.ADD_NORM_MMA_MAX_ROWS=16
    python3 benchmarks/profile_variants.py --smoke       # tiny model on CPU: checks the script

--variant NAME=SETTINGS, SETTINGS being MODULE.ATTR=VALUE pairs joined by ';' (MODULE a module of
moeserve.kernels, ATTR one of its existing names, VALUE a Python literal); NAME= alone runs the code as it
is. Writes profile_variants.json into --out-dir (default $OUT, else .).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_variant(text: str) -> tuple[str, list[tuple[str, str, object]]]:
    """'NAME=MOD.ATTR=VALUE;...' -> (NAME, [(MOD, ATTR, value)]); raises ValueError on a malformed one."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: write NAME=SETTINGS (NAME= for the code as it is)")
    settings = []
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        target, sep, value = item.partition("=")
        module, dot, attr = target.rpartition(".")
        if not sep or not dot or not module or not attr:
            raise ValueError(f"--variant {name}: {item!r} is not MODULE.ATTR=VALUE")
        try:
            settings.append((module, attr, ast.literal_eval(value)))
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"--variant {name}: {value!r} is not a Python literal ({exc})") from None
    return name, settings


def apply(settings: list[tuple[str, str, object]]) -> None:
    """Set each moeserve.kernels.MODULE.ATTR; an unknown module or name is an error, not a silent no-op."""
    for module, attr, value in settings:
        mod = importlib.import_module(f"moeserve.kernels.{module}")
        if not hasattr(mod, attr):
            raise SystemExit(f"moeserve.kernels.{module} has no {attr}")
        setattr(mod, attr, value)


def _run_one(settings: list, profile_args: list[str]) -> int:
    """The child: settings applied, then profile_engine in this process."""
    sys.path.insert(0, str(HERE))
    import bench_serving as bs
    import profile_engine

    bs.ensure_importable()
    apply(settings)
    return profile_engine.main(profile_args)


def summary(report: dict) -> dict:
    """Per model and batch: the graphed decode step and the prompt steps (ms), from profile_engine.json."""
    out = {}
    for model, r in report.items():
        if "error" in r:
            out[model] = {"error": r["error"]}
            continue
        out[model] = {b: dict(decode_graph_ms=v["decode_graph_ms"], prefill_steps_ms=v["prefill_steps_ms"])
                      for b, v in r.items() if b.isdigit()}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_run"]:
        return _run_one(json.loads(argv[1]), argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="NAME=MODULE.ATTR=VALUE;... (repeatable)")
    p.add_argument("--rounds", type=int, default=2, help="times each variant runs, taking turns (default 2)")
    p.add_argument("--models", default="qwen3-30b-a3b")
    p.add_argument("--batches", default="16,64")
    p.add_argument("--decode-steps", type=int, default=40)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        variants = [parse_variant(v) for v in args.variant or ["base="]]
    except ValueError as exc:
        p.error(str(exc))
    if len({name for name, _ in variants}) < len(variants):
        p.error("two variants share a name")
    profile_args = (["--smoke"] if args.smoke else
                    ["--models", args.models, "--batches", args.batches, "--decode-steps", str(args.decode_steps)])
    out = Path(args.out_dir or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {name: [] for name, _ in variants}
    for round_ in range(args.rounds):
        for name, settings in variants:
            with tempfile.TemporaryDirectory() as tmp:
                run = subprocess.run([sys.executable, __file__, "_run", json.dumps(settings), *profile_args,
                                      "--out-dir", tmp], capture_output=True, text=True)
                path = Path(tmp) / "profile_engine.json"
                report = json.loads(path.read_text()) if path.exists() else {}
            if run.returncode != 0 and not report:
                sys.stderr.write(run.stdout[-2000:] + run.stderr[-3000:])
                raise SystemExit(f"variant {name} (round {round_ + 1}) failed: exit {run.returncode}")
            results[name].append(summary(report))
            for model, batches in results[name][-1].items():
                for b, v in batches.items():
                    if b == "error":
                        print(f"{name} round {round_ + 1} {model}: {v}", flush=True)
                        continue
                    print(f"{name} round {round_ + 1} {model} batch {b}: decode step {v['decode_graph_ms']:.2f} ms "
                          f"graphed; prompt steps {[round(x, 1) for x in v['prefill_steps_ms']]} ms", flush=True)
    (out / "profile_variants.json").write_text(json.dumps(
        dict(variants={name: [list(s) for s in settings] for name, settings in variants}, rounds=args.rounds,
             profile_args=profile_args, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
