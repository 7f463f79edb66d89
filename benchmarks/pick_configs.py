"""Keep, for each expert shape, weight format and token count, the faster of the launch
configurations that two `bench_kernels.py` runs on the same GPU used, and write them into that GPU's
table.

Two tables can serve one GPU: its own, and (through kernels/configs.SAME_PROCESSOR) the table of a
GPU with the same processor, tuned later with newer kernels (GEMVs, TMA loads). Run bench_kernels
once with each (move the GPU's own file aside for the second run), then:

    python benchmarks/pick_configs.py own/bench_kernels.json borrowed/bench_kernels.json \
        --table kernels/configs/NVIDIA_H100_80GB_HBM3.json

Each measured (shape, format, token count) gets, in the table, the configuration of the run whose
call was faster, under the token count's own bucket; the rest of the table is left as it was. It
prints every choice with both times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moeserve.kernels.configs import shape_key
from moeserve.kernels.roofline import SHAPES

QUANTS = ("bf16", "fp8")


def pick(runs: list[dict], table: dict) -> tuple[dict, list[str]]:
    """The table with each measured case's fastest configuration; and one line per choice."""
    gpus = {run["gpu"] for run in runs}
    if len(gpus) != 1:
        raise ValueError(f"the runs come from different GPUs: {sorted(gpus)}")
    best: dict[tuple[str, str, int], tuple[float, int, dict]] = {}
    for i, run in enumerate(runs):
        for row in run["rows"]:
            for quant in QUANTS:
                case = (row["shape"], quant, int(row["tokens"]))
                ms = float(row[quant]["ms"])
                if case not in best or ms < best[case][0]:
                    best[case] = (ms, i, {k: v for k, v in row[quant]["config"].items() if v is not None})
    out = {key: dict(buckets) for key, buckets in table.items()}
    lines = []
    for (name, quant, tokens), (ms, i, config) in sorted(best.items()):
        shape = SHAPES[name]
        key = shape_key(shape.experts, shape.hidden, shape.inter, shape.top_k, quant)
        out.setdefault(key, {})[str(tokens)] = config
        times = ", ".join(f"run {j}: {row[quant]['ms'] * 1e3:.1f} us" for j, run in enumerate(runs)
                          for row in run["rows"] if (row["shape"], int(row["tokens"])) == (name, tokens))
        lines.append(f"{name} {quant} {tokens} tokens: run {i} ({times})")
    return out, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="bench_kernels.json files of runs on one GPU")
    ap.add_argument("--table", type=Path, required=True, help="the GPU's table file, rewritten")
    args = ap.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.runs]
    table = json.loads(args.table.read_text()) if args.table.exists() else {}
    out, lines = pick(runs, table)
    print("\n".join(lines))
    args.table.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
