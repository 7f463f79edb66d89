"""The launch configurations the autotuner tries for one shape, token count and weight format.

Few rows per expert (decode) is weight-bandwidth bound: small BLOCK_M, many programs along N, deep
pipelines. Many rows is tensor-core bound: 64/128-row tiles and wider N. Candidates whose shared
memory would not fit are left out before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import itertools

from .configs import GemmConfig
from .moe_gemv import padded_k, reduction_pieces

SMEM_LIMIT = 200 * 1024  # of the H100's 227 KB per block, leaving room for the epilogue
PER_SLOT_MAX_TOKENS = 8  # beyond this a token's experts repeat across tokens and re-reads cost more
GEMV_MAX_TOKENS = 8  # the expert GEMVs (moe_gemv.py) read every slot's rows apart, like the per-slot path
GEMV_TILE_BYTES = 65536  # weight bytes one GEMV program may hold in registers


def rows_per_expert(num_tokens: int, num_experts: int, top_k: int) -> float:
    """Mean rows each touched expert sees when routing is spread evenly."""
    slots = num_tokens * top_k
    return slots / max(1, min(num_experts, slots))


def block_m_choices(num_tokens: int, num_experts: int, top_k: int) -> list[int]:
    """BLOCK_M values worth timing: from half the mean rows per expert (several blocks, little
    padding) to four times it (one block per expert, so its weights are read once)."""
    r = rows_per_expert(num_tokens, num_experts, top_k)
    return [bm for bm in (16, 32, 64, 128) if min(64, r / 2) <= bm <= max(16, 4 * r)]


def smem_bytes(block_m: int, cfg: GemmConfig, gated: bool, weight_bytes: int) -> int:
    """Shared memory of the software pipeline: A tile and one (two when gated) B tiles per stage."""
    a = block_m * cfg.block_k * 2
    b = (2 if gated else 1) * cfg.block_k * cfg.block_n * weight_bytes
    return cfg.num_stages * (a + b)


def gemm_choices(block_m: int, quant: str, gated: bool) -> list[GemmConfig]:
    """Candidate GemmConfigs for one GEMM (gated: the gate/up GEMM). Tensor-core tiles (64 rows and
    more) are tried with per-thread loads and with TMA loads; weight streaming keeps per-thread loads,
    and tiles of 64 weight rows and more are also tried swapped (GemmConfig.swap_ab)."""
    weight_bytes = 2 if quant == "bf16" else 1
    block_ks = [128] if quant == "fp8" else [64, 128, 256]
    if block_m <= 32:
        # Weight streaming: FP8 tiles hold half the bytes, so deeper pipelines keep as much in flight.
        stages = [3, 4, 5, 6, 8] if quant == "fp8" else [3, 4, 5, 6]
        grid = itertools.product([16, 32, 64, 128], block_ks, [4], stages)
    else:
        grid = itertools.product([64, 128, 256], [k for k in block_ks if k <= 128], [4, 8], [3, 4])
    out = []
    for bn, bk, warps, stages in grid:
        cfg = GemmConfig(block_n=bn, block_k=bk, group_m=8, num_warps=warps, num_stages=stages)
        if block_m <= 32 and bn == 16 and bk < 128:
            continue  # tiny tiles only pay with long K steps
        if smem_bytes(block_m, cfg, gated, weight_bytes) <= SMEM_LIMIT:
            out.append(cfg)
            if block_m >= 64:
                out.append(dataclasses.replace(cfg, tma=True))
            elif bn >= 64:  # swapped, 64+ weight rows fill a warpgroup tile whatever the token rows
                out.append(dataclasses.replace(cfg, swap_ab=True))
    return out


def prequant_choices(quant: str) -> list[bool]:
    """Whether to time FP8 activations quantised once up front: an extra launch per GEMM, against
    quantising in every program (costly once many programs share rows, and on the decode path's
    critical chain)."""
    return [False, True] if quant == "fp8" else [False]


def per_slot_choices(num_tokens: int) -> list[bool]:
    """Whether to time the per-slot decode path (no permutation) besides the aligned one."""
    return [False, True] if num_tokens <= PER_SLOT_MAX_TOKENS else [False]


def gemv_tile(quant: str) -> int:
    """Weight elements one GEMV program may hold (GEMV_TILE_BYTES of them)."""
    return GEMV_TILE_BYTES // (2 if quant == "bf16" else 1)


def gemv_up_choices(num_tokens: int, hidden: int, quant: str) -> list[tuple[int, int]]:
    """(columns per program, warps) of the gate/up GEMV worth timing: nothing past GEMV_MAX_TOKENS;
    a program's gate and up rows must fit gemv_tile()."""
    if num_tokens > GEMV_MAX_TOKENS:
        return []
    kp = padded_k(hidden, quant)
    return [(rows, warps) for rows in (1, 2, 4, 8, 16, 32) for warps in (4, 8) if 2 * rows * kp <= gemv_tile(quant)]


def gemv_down_choices(num_tokens: int, inter: int, top_k: int, quant: str) -> list[tuple[int, int, bool, int]]:
    """(columns per program, warps, combine, reduction pieces) of the down GEMV worth timing; with
    combine a program holds the rows of all top_k slots (padded to a power of two). Pieces beyond one
    only where they drop padding (reduction_pieces)."""
    if num_tokens > GEMV_MAX_TOKENS:
        return []
    kp = padded_k(inter, quant)
    slots = 1 << (top_k - 1).bit_length()
    pieces = [1] + [n for n in (2, 3) if reduction_pieces(inter, quant, n) != reduction_pieces(inter, quant, n - 1)]
    return [(rows, warps, combine, n) for combine in (False, True) for rows in (1, 2, 4, 8, 16, 32, 64)
            for warps in (4, 8) if (slots if combine else 1) * rows * kp <= gemv_tile(quant) for n in pieces]
