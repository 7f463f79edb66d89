"""`moeserve demo-model DIR`: write a deterministic random checkpoint (the embedded demo, or a real-size preset)."""

from __future__ import annotations

import argparse
import json
import re


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 500MB or 5GB, got {text!r}")
    return int(float(m.group(1)) * {None: 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[m.group(2)])


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--config-override is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--config-override must be a JSON object of config.json fields")
    return value


def register(subparsers) -> None:
    from moeserve.models.demo_presets import PRESETS

    p = subparsers.add_parser(
        "demo-model",
        help="write a deterministic random checkpoint (config, safetensors, tokenizer) from a seed",
        description="Write a random HF-format checkpoint. 'demo' is the small DeepSeek-V3-architecture model "
        "the server uses by default; the other presets have the real sizes, for GPU benchmarks.",
    )
    p.add_argument("dir", help="output directory (must not already hold a checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="weights depend only on the seed and the config (default 0)")
    p.add_argument("--preset", choices=list(PRESETS), default="demo", help="architecture and size (default demo)")
    p.add_argument("--config-override", type=_json_object, default=None, metavar="JSON",
                   help='config.json fields to change, e.g. \'{"num_hidden_layers": 4}\'')
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp8"], default=None,
                   help="stored dtype (default: float32 for demo, bfloat16 otherwise; fp8 = DeepSeek block-scaled e4m3)")
    p.add_argument("--max-shard-size", type=_size, default=5 * 1024**3, metavar="SIZE",
                   help="split safetensors above this size (default 5GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeserve.models.demo import write_demo_model

    try:
        path = write_demo_model(args.dir, seed=args.seed, preset=args.preset, config_override=args.config_override,
                                dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    except (FileExistsError, ValueError) as exc:
        print(f"moeserve demo-model: {exc}")
        return 2
    print(path)
    return 0
