"""Launch configurations of the fused expert GEMMs: a per-GPU JSON table, with defaults.

`kernels/configs/<gpu>.json` (written by benchmarks/autotune_kernels.py) maps a shape key to token
buckets, each holding one `MoeConfig` as a dict:

    {"E=128,H=2048,I=768,k=8,bf16": {"1": {"block_m": 16, "up": {...}, "down": {...}}, "64": ...}}

The bucket nearest to the call's token count (in log scale) is used; shapes absent from the table
get `default_config`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def _check_powers_of_two(config, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(config, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"{type(config).__name__}.{name} must be a power of two, got {v}")


@dataclass(frozen=True)
class GemmConfig:
    """Tile and launch parameters of one grouped GEMM (block_m is shared, see MoeConfig); tma: weight
    tiles (and the down GEMM's activation tiles) loaded by the tensor-memory accelerator (Hopper and
    later) rather than per thread; swap_ab: the tensor cores compute C.T = B @ A.T, so that BLOCK_N
    (the weights' rows) fills the instruction's M and few token rows its N (decode on Hopper)."""

    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False
    swap_ab: bool = False

    def __post_init__(self) -> None:
        _check_powers_of_two(self, ("block_n", "block_k", "num_warps"))
        if self.block_n < 16 or self.block_k < 16:
            raise ValueError("GemmConfig.block_n and block_k must be >= 16 (tensor-core tile)")
        if self.num_stages < 1 or self.group_m < 1:
            raise ValueError("GemmConfig.num_stages and group_m must be >= 1")


@dataclass(frozen=True)
class GemvConfig:
    """The expert GEMVs of moe_gemv.py (decode): output columns per program of the gate/up and the
    down GEMV, their warps, whether the down GEMV also sums each token's slots (no combine launch),
    whether FP8 activations are quantised by a launch of their own before each GEMV (prequant)
    rather than in every program, and in how many power-of-two pieces (1-3) the down GEMV splits its
    reduction (moe_gemv.reduction_pieces; 1: one piece padded to a power of two)."""

    up_rows: int = 4
    down_rows: int = 8
    up_warps: int = 4
    down_warps: int = 4
    combine: bool = True
    up_prequant: bool = False
    down_prequant: bool = False
    down_pieces: int = 1

    def __post_init__(self) -> None:
        _check_powers_of_two(self, ("up_rows", "down_rows", "up_warps", "down_warps"))
        if self.down_pieces not in (1, 2, 3):
            raise ValueError(f"GemvConfig.down_pieces must be 1, 2 or 3, got {self.down_pieces}")
        if max(self.up_rows, self.down_rows) > 128:  # a program's columns share one FP8 128-row scale block
            raise ValueError(f"GemvConfig rows per program must be <= 128, got {self.up_rows} and {self.down_rows}")


@dataclass(frozen=True)
class MoeConfig:
    """block_m (rows per expert block, shared by the permutation and both GEMMs) and the two GEMMs;
    per_slot skips the permutation and gives each slot its own block (decode: one or a few tokens);
    prequant (FP8) quantises each GEMM's activations once up front rather than in every program
    (pays when many programs share the same rows: large batches); gemv, when set, runs the call as
    moe_gemv.py's GEMVs instead of the tensor-core GEMMs (decode: a row per expert)."""

    block_m: int = 16
    up: GemmConfig = field(default_factory=GemmConfig)
    down: GemmConfig = field(default_factory=GemmConfig)
    per_slot: bool = False
    prequant: bool = False
    gemv: GemvConfig | None = None

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"MoeConfig.block_m must be a power of two >= 16, got {self.block_m}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "MoeConfig":
        return MoeConfig(block_m=int(d["block_m"]), up=GemmConfig(**d["up"]), down=GemmConfig(**d["down"]),
                         per_slot=bool(d.get("per_slot", False)), prequant=bool(d.get("prequant", False)),
                         gemv=GemvConfig(**d["gemv"]) if d.get("gemv") else None)


def shape_key(num_experts: int, hidden: int, inter: int, top_k: int, quant: str) -> str:
    """The table key of one expert shape (quant: 'bf16', 'fp8' or 'int8')."""
    return f"E={num_experts},H={hidden},I={inter},k={top_k},{quant}"


def device_file_name(device_name: str) -> str:
    """Table file of a GPU, from torch.cuda.get_device_name (e.g. 'NVIDIA H100 80GB HBM3')."""
    return "".join(c if c.isalnum() else "_" for c in device_name).strip("_") + ".json"


# GPUs built on the same processor (same multiprocessors, tensor cores and shared memory; memory
# differs): one with no table of its own borrows the first of its group that has one. The tiles that
# win are set by the processor; faster memory moves where bandwidth-bound turns compute-bound, which
# the GPU's own table (benchmarks/autotune_kernels.py) captures better.
SAME_PROCESSOR = (
    ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H100", "NVIDIA H800", "NVIDIA H200 NVL",
     "NVIDIA H100 NVL", "NVIDIA GH200 480GB"),
)


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict:
    """The parsed table of a GPU, {} when the repo has none. Token buckets it lacks come from the
    tables of GPUs with the same processor (a table tuned only where it matters, e.g. an H200's large
    batches, keeps the H100's entries for the rest); its own buckets win."""
    names = [device_name] + [other for group in SAME_PROCESSOR if device_name in group
                             for other in group if other != device_name]
    merged: dict = {}
    for name in reversed(names):
        path = CONFIG_DIR / device_file_name(name)
        if path.exists():
            with path.open() as f:
                for key, buckets in json.load(f).items():
                    merged.setdefault(key, {}).update(buckets)
    return merged


def default_config(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int,
                   quant: str = "bf16") -> MoeConfig:
    """Heuristic when the table has no entry: small tiles and many programs while weight-bandwidth
    bound (few rows per expert), large tensor-core tiles once each expert sees many rows."""
    rows_per_expert = num_tokens * top_k / max(1, min(num_experts, num_tokens * top_k))
    bk = 128 if quant == "fp8" else 64
    if rows_per_expert <= 16:
        small = GemmConfig(block_n=32, block_k=bk if quant == "fp8" else 128, num_warps=4, num_stages=4)
        # One token's experts are distinct: the permutation would only cost a launch.
        return MoeConfig(16, small, GemmConfig(block_n=64, block_k=bk if quant == "fp8" else 128,
                                                num_warps=4, num_stages=4), per_slot=num_tokens == 1)
    if rows_per_expert <= 64:
        mid = GemmConfig(block_n=64, block_k=bk, num_warps=4, num_stages=4)
        return MoeConfig(32, mid, GemmConfig(block_n=128, block_k=bk, num_warps=4, num_stages=4))
    # FP8 keeps 128-deep K steps (one activation scale each), so fewer stages fit in shared memory.
    stages = 3 if quant == "fp8" else 4
    big = GemmConfig(block_n=128, block_k=bk, num_warps=8, num_stages=stages)
    return MoeConfig(64 if rows_per_expert <= 128 else 128, big,
                     GemmConfig(block_n=128, block_k=bk, num_warps=8, num_stages=stages), prequant=quant == "fp8")


# How far (in powers of two of the token count) a table's decode-path entry reaches: a bucket of 4
# tokens serves 1 to 16; tensor-core tiles serve whatever their nearest bucket is.
DECODE_REACH = 2


@functools.lru_cache(maxsize=4096)  # on every call's host path; MoeConfig is immutable
def get_config(device_name: str, num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int,
               quant: str = "bf16") -> MoeConfig:
    """The table's entry for this shape at the nearest token bucket, else `default_config`."""
    entry = load_table(device_name).get(shape_key(num_experts, hidden, inter, top_k, quant))
    if not entry:
        return default_config(num_tokens, num_experts, hidden, inter, top_k, quant)
    target = math.log2(max(1, num_tokens))
    bucket = min(entry, key=lambda b: (abs(math.log2(int(b)) - target), int(b)))
    config = MoeConfig.from_dict(entry[bucket])
    if (config.gemv is not None or config.per_slot) and abs(math.log2(int(bucket)) - target) > DECODE_REACH:
        # A decode path (a GEMV or a block per slot) far from the few tokens it was tuned at: on an
        # H100 the H200's DeepSeek-V3 table, tuned only at 1-4 tokens, ran 4096 tokens 60x slower so.
        return default_config(num_tokens, num_experts, hidden, inter, top_k, quant)
    return config
