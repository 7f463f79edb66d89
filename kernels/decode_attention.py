"""Triton paged decode attention: one query per sequence, read straight from the paged KV cache.

The plain path (kernels/reference.py, and the models' batched gather on CPU) copies every
sequence's cached keys and values into a padded [B, H, L, D] tensor, casts them to float32 and runs
two matmuls: at batch 64 on an H200 that gather and its casts were a third of a Qwen3-30B-A3B decode
step. Here each program walks the block table itself and reads each cached row once, flash-decoding
style:

- stage 1, grid (sequence, KV head x query-head block, split): a split is a fixed range of context
  positions; the program scores its query heads (the GQA group of one KV head, side by side, so a
  cached row is read once for all of them) against BLOCK_N cached rows at a time with tensor-core
  dots accumulated in float32, keeps an online softmax, and writes its partial output and
  log-sum-exp in float32;
- stage 2, grid (sequence, query head): merges the splits.

Splitting the context keeps the GPU busy when the batch is small or the context long. The number of
splits depends only on the batch's shape (sequences and the longest context), never on device
values, so a step captured in a CUDA graph replays it for any lengths up to that shape.

MLA (DeepSeek) uses it with one KV "head" of the compressed latent: keys are the whole cached row
(kv_lora_rank + rope dims, read as a power-of-two main part and a tail) and values its first
kv_lora_rank columns, taken from the key tile already loaded rather than read again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import empty
from .pdl import enter, launch_args

TARGET_PROGRAMS = 264  # two per multiprocessor of an H100/H200: enough to hide memory latency
MAX_SPLITS = 64


# Launch arguments that vary from step to step (table widths, split counts and the strides made from
# them) are not specialised on: each new value class (1, a multiple of 16, other) would otherwise
# compile a variant in the middle of serving, a stall of hundreds of milliseconds in an eager step.
@triton.jit(do_not_specialize=["chunk", "window", "stride_tb", "stride_ob", "stride_oh", "stride_lb", "stride_lh"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr,
    scale, chunk, window,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    W1: tl.constexpr, W2: tl.constexpr, WV: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, V_FROM_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    # W1, W2, WV: the tile widths of D1, D2, DV, at least 16 (a dot's inner width); the columns past a
    # head's own width are masked off (zeros), so they add nothing to scores or outputs
    enter(PDL)
    b = tl.program_id(0)
    hg = tl.program_id(1)
    s = tl.program_id(2)
    g_blocks: tl.constexpr = (GROUP + BLOCK_G - 1) // BLOCK_G
    kvh = hg // g_blocks
    g = (hg % g_blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    heads = kvh * GROUP + g

    ctx = tl.load(lens_ptr + b).to(tl.int32)  # int32 or int64 lengths (the graph path holds int64)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, ctx)
    if window > 0:
        lo = tl.maximum(lo, ctx - window)

    d1 = tl.arange(0, W1)
    d1_ok = d1 < D1 if W1 > D1 else tl.full([W1], 1, tl.int1)  # a constant where nothing is padded
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q1 = tl.load(q_rows + d1[None, :], mask=g_ok[:, None] & d1_ok[None, :], other=0.0)
    if D2 > 0:
        d2 = tl.arange(0, W2)
        d2_ok = d2 < D2 if W2 > D2 else tl.full([W2], 1, tl.int1)
        q2 = tl.load(q_rows + D1 + d2[None, :], mask=g_ok[:, None] & d2_ok[None, :], other=0.0)
    dv = tl.arange(0, WV)
    dv_ok = dv < DV if WV > DV else tl.full([WV], 1, tl.int1)

    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, WV], dtype=tl.float32)
    table = tables_ptr + b * stride_tb
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_ok = pos < hi
        block = tl.load(table + pos // PAGE, mask=p_ok, other=0).to(tl.int64)
        slot = pos % PAGE
        k_row = k_ptr + block * stride_kb + slot * stride_ks + kvh * stride_kh
        k1 = tl.load(k_row[:, None] + d1[None, :], mask=p_ok[:, None] & d1_ok[None, :], other=0.0)
        if IEEE:
            scores = tl.dot(q1, tl.trans(k1), input_precision="ieee")
        else:
            scores = tl.dot(q1, tl.trans(k1))
        if D2 > 0:
            k2 = tl.load(k_row[:, None] + D1 + d2[None, :], mask=p_ok[:, None] & d2_ok[None, :], other=0.0)
            if IEEE:
                scores += tl.dot(q2, tl.trans(k2), input_precision="ieee")
            else:
                scores += tl.dot(q2, tl.trans(k2))
        scores = tl.where(p_ok[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if V_FROM_K:
            v = k1
        else:
            v_row = v_ptr + block * stride_vb + slot * stride_vs + kvh * stride_vh
            v = tl.load(v_row[:, None] + dv[None, :], mask=p_ok[:, None] & dv_ok[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    empty_split = l == 0.0  # a split wholly past the context (or before the window)
    out = acc / tl.where(empty_split, 1.0, l)[:, None]
    lse = tl.where(empty_split, float("-inf"), m + tl.log(tl.where(empty_split, 1.0, l)))
    o_rows = out_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os
    tl.store(o_rows + dv[None, :], out, mask=g_ok[:, None] & dv_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=g_ok)


@triton.jit(do_not_specialize=["splits", "stride_pb", "stride_ph", "stride_lb", "stride_lh"])
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr, splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    DV: tl.constexpr, MAX_S: tl.constexpr, TILE_S: tl.constexpr, PDL: tl.constexpr,
):
    # one variant for every split count: the weights from all MAX_S log-sum-exps at once, then the
    # partial outputs TILE_S splits at a time (a [MAX_S, DV] tile would not fit in registers for MLA)
    enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    lse_row = lse_ptr + b * stride_lb + h * stride_lh
    s = tl.arange(0, MAX_S)
    lse = tl.load(lse_row + s, mask=s < splits, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top > float("-inf"), top, 0.0)
    total = tl.maximum(tl.sum(tl.exp(lse - top), axis=0), 1e-30)  # no context: zeros, not NaN
    dv = tl.arange(0, DV)
    out = tl.zeros([DV], dtype=tl.float32)
    for s0 in range(0, splits, TILE_S):
        t = s0 + tl.arange(0, TILE_S)
        t_ok = t < splits
        w = tl.exp(tl.load(lse_row + t, mask=t_ok, other=float("-inf")) - top) / total
        part = tl.load(part_ptr + b * stride_pb + h * stride_ph + t[:, None] * stride_ps + dv[None, :],
                       mask=t_ok[:, None], other=0.0)
        out += tl.sum(part * w[:, None], axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dv, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class Launch:
    """How the split kernel runs: BLOCK_N cached rows per step, warps, pipeline stages, and the
    programs the splits aim for (benchmarks/bench_decode_attention.py times the choices)."""

    block_n: int
    num_warps: int
    num_stages: int = 2
    target_programs: int = TARGET_PROGRAMS


def default_launch(dk: int, dv: int) -> Launch:
    """The launch that stayed within 9% (MLA's 576-wide latent rows) and 6% (Qwen3-30B-A3B's heads)
    of the best at batch 1, 16 and 64 on an H200 (benchmarks/bench_decode_attention.py, context 320;
    docs/benchmarks.md). For MLA, fewer and longer splits: each program holds the accumulators of
    all 16 heads, and at batch 64 the partial outputs of more splits cost more than they hid."""
    return Launch(32, 4, 2, 132) if max(dk, dv) > 256 else Launch(32, 4, 3, 528)


def plan_splits(num_seqs: int, programs_per_seq: int, max_len: int, block_n: int,
                target_programs: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """(splits, positions per split) for a batch shape: enough programs to fill the GPU, each with at
    least one tile of BLOCK_N positions; a function of the shape alone (see the module docstring)."""
    tiles = max(1, math.ceil(max_len / block_n))
    want = math.ceil(target_programs / max(1, num_seqs * programs_per_seq))
    splits = max(1, min(want, tiles, MAX_SPLITS))
    chunk = math.ceil(tiles / splits) * block_n
    return math.ceil(max_len / chunk), chunk


def _pow2_split(dim: int) -> tuple[int, int]:
    """A key width as a power-of-two main part and a power-of-two tail (576 -> 512 + 64), or raise."""
    main = 1 << (dim.bit_length() - 1)
    tail = dim - main
    if tail and tail & (tail - 1):
        raise ValueError(f"decode attention supports head widths of p or p + q (powers of two), got {dim}")
    return main, tail


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_len: int,
    sliding_window: int | None = None,
    launch: Launch | None = None,
) -> torch.Tensor:
    """q [B, Hq, Dk] over caches [blocks, block_size, Hk, Dk] / [..., Hk, Dv] -> [B, Hq, Dv] (q's dtype).

    block_tables [B, W] int32, context_lens [B] (on q's device); max_len bounds every context (the
    launch shape; larger lengths would be cut). v_cache may be a view of k_cache's leading columns
    (MLA), read then from the key tiles. Heads are split evenly: Hq a multiple of Hk.
    """
    b, hq, dk = q.shape
    _nb, page, hk, dk_cache = k_cache.shape
    dv = v_cache.shape[-1]
    if dk_cache != dk or hq % hk or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"decode attention shapes disagree: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode attention needs q and the caches contiguous in their last dimension")
    d1, d2 = _pow2_split(dk)
    if dv & (dv - 1):
        raise ValueError(f"decode attention supports value widths that are powers of two, got {dv}")
    group = hq // hk
    block_g = max(16, min(32, triton.next_power_of_2(group)))
    g_blocks = math.ceil(group / block_g)
    launch = launch or default_launch(dk, dv)
    block_n = launch.block_n
    splits, chunk = plan_splits(b, hk * g_blocks, max(1, max_len), block_n, launch.target_programs)
    v_from_k = (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and dv == d1)
    part = empty(b, hq, splits, dv, dtype=torch.float32, device=q.device)
    lse = empty(b, hq, splits, dtype=torch.float32, device=q.device)
    out = empty(b, hq, dv, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    _split_kernel[(b, hk * g_blocks, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse,
        scale, chunk, sliding_window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_G=block_g, D1=d1, D2=d2, DV=dv, W1=max(16, d1), W2=max(16, d2) if d2 else 0,
        WV=max(16, dv), BLOCK_N=block_n, PAGE=page, V_FROM_K=v_from_k,
        IEEE=q.dtype == torch.float32, num_warps=launch.num_warps, num_stages=launch.num_stages, **launch_args(q),
    )
    _merge_kernel[(b, hq)](
        part, lse, out, splits,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        DV=dv, MAX_S=MAX_SPLITS, TILE_S=16, num_warps=4, **launch_args(part),
    )
    return out
