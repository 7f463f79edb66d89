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
- stage 2, grid (sequence, query head): merges the splits. A batch whose contexts take one split
  each skips it: the split kernel writes the output itself. With Launch.fused_merge the split kernel
  merges too: the last split of each (sequence, head block) to finish, found by an atomic count, reads
  the others' partials back and writes the output (no second launch). A launch choice, off by default:
  not yet timed on a GPU (benchmarks/bench_decode_attention.py's third grid times it).

Splitting the context keeps the GPU busy when the batch is small or the context long. The number of
splits depends only on the batch's shape (sequences and the longest context), never on device
values, so a step captured in a CUDA graph replays it for any lengths up to that shape.

In a decode step the kernel launched just before writes only the step's new rows (rope_and_cache),
so GQA attention calls it `settled`: each program reads its lengths, block table entries and first
tile of older rows before its PDL wait (pdl.py), while that kernel still runs, and the one new row
after. (MLA's wide latent rows made its step slower that way at its launch; it does not.)

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

from .launch import TWO_PROGRAMS_PER_SM, empty
from .pdl import enter, launch_args

TARGET_PROGRAMS = TWO_PROGRAMS_PER_SM
MAX_SPLITS = 64
# default_launch's short splits merged in the split kernel (Launch.fused_merge) rather than by a merge launch:
# off until a GPU run times it in decode steps (benchmarks/profile_variants.py; bench_decode_attention.py alone)
FUSED_MERGE = False


@triton.jit
def _tile_rows(k_ptr, v_ptr, block_g, pos, ok, kvh, d1, d1_ok, d2, d2_ok, dv, dv_ok,
               stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
               D1: tl.constexpr, D2: tl.constexpr, PAGE: tl.constexpr, V_FROM_K: tl.constexpr):
    """The cached rows at positions pos [BLOCK_N] where ok: keys (main part, tail) and values, zeros
    elsewhere. block_g: the rows' cache blocks (from the block table)."""
    slot = pos % PAGE
    k_row = k_ptr + block_g * stride_kb + slot * stride_ks + kvh * stride_kh
    k1 = tl.load(k_row[:, None] + d1[None, :], mask=ok[:, None] & d1_ok[None, :], other=0.0)
    k2 = k1
    if D2 > 0:
        k2 = tl.load(k_row[:, None] + D1 + d2[None, :], mask=ok[:, None] & d2_ok[None, :], other=0.0)
    if V_FROM_K:
        v = k1
    else:
        v_row = v_ptr + block_g * stride_vb + slot * stride_vs + kvh * stride_vh
        v = tl.load(v_row[:, None] + dv[None, :], mask=ok[:, None] & dv_ok[None, :], other=0.0)
    return k1, k2, v


@triton.jit
def _queries(q_ptr, b, heads, g_ok, d1, d1_ok, d2, d2_ok, stride_qb, stride_qh, D1: tl.constexpr, D2: tl.constexpr):
    """The program's query rows: main part and tail (the main part again when there is no tail)."""
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q1 = tl.load(q_rows + d1[None, :], mask=g_ok[:, None] & d1_ok[None, :], other=0.0)
    q2 = q1
    if D2 > 0:
        q2 = tl.load(q_rows + D1 + d2[None, :], mask=g_ok[:, None] & d2_ok[None, :], other=0.0)
    return q1, q2


@triton.jit
def _attend_tile(q1, q2, k1, k2, v, p_ok, m, l, acc, scale, D2: tl.constexpr, IEEE: tl.constexpr):
    """One tile of the online softmax: (m, l, acc) after the rows where p_ok. A tile with no such row
    (the peeled first tile of an empty split) leaves them as they were: its maximum is -inf, and the
    exponentials are then taken from 0."""
    if IEEE:
        scores = tl.dot(q1, tl.trans(k1), input_precision="ieee")
    else:
        scores = tl.dot(q1, tl.trans(k1))
    if D2 > 0:
        if IEEE:
            scores += tl.dot(q2, tl.trans(k2), input_precision="ieee")
        else:
            scores += tl.dot(q2, tl.trans(k2))
    scores = tl.where(p_ok[None, :], scores * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp(m - m_use)
    p = tl.exp(scores - m_use[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


# Launch arguments that vary from step to step (table widths, split counts and the strides made from
# them) are not specialised on: each new value class (1, a multiple of 16, other) would otherwise
# compile a variant in the middle of serving, a stall of hundreds of milliseconds in an eager step.
@triton.jit(do_not_specialize=["chunk", "window", "direct", "splits", "stride_tb", "stride_ob", "stride_oh",
                               "stride_lb", "stride_lh", "stride_fb", "stride_fh"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr, final_ptr, counts_ptr,
    scale, chunk, window, direct, splits,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_fb, stride_fh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    W1: tl.constexpr, W2: tl.constexpr, WV: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, V_FROM_K: tl.constexpr, IEEE: tl.constexpr,
    SETTLED: tl.constexpr, MERGE: tl.constexpr, MAX_S: tl.constexpr, PDL: tl.constexpr,
):
    # W1, W2, WV: the tile widths of D1, D2, DV, at least 16 (a dot's inner width); the columns past a
    # head's own width are masked off (zeros), so they add nothing to scores or outputs.
    # direct (one split, a run-time flag so that steps of one split and of several share a compiled
    # variant): the program writes the final [B, Hq, DV] output at final_ptr in its dtype, not the
    # partial output and log-sum-exp.
    # MERGE (several splits): the split that finishes last among those of its (sequence, head block) merges
    # them, instead of a merge launch: each split counts itself in counts_ptr (one int32 per program of a
    # split, zero between calls: the last one puts it back) after its partial output and log-sum-exp are
    # stored, and the one that counts splits reads them all back.
    # SETTLED: the lengths, the block tables and every cached row but each sequence's last were written
    # before the kernel launched just before this one (pdl.py), so the split's first tile is read before
    # the PDL wait, overlapping that kernel, and only the last row (the step's own) after it.
    if not SETTLED:
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
    d2 = tl.arange(0, 16)  # placeholders where keys have no tail (D2 == 0): never read
    d2_ok = d2 < 0
    if D2 > 0:
        d2 = tl.arange(0, W2)
        d2_ok = d2 < D2 if W2 > D2 else tl.full([W2], 1, tl.int1)
    dv = tl.arange(0, WV)
    dv_ok = dv < DV if WV > DV else tl.full([WV], 1, tl.int1)
    table = tables_ptr + b * stride_tb

    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, WV], dtype=tl.float32)
    first = lo
    if SETTLED:  # the first tile, peeled from the loop below, read before the wait but for its last row
        pos = lo + tl.arange(0, BLOCK_N)
        p_ok = pos < hi
        block = tl.load(table + pos // PAGE, mask=p_ok, other=0).to(tl.int64)
        k1, k2, v = _tile_rows(k_ptr, v_ptr, block, pos, p_ok & (pos < ctx - 1), kvh, d1, d1_ok, d2, d2_ok, dv,
                               dv_ok, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, D1, D2, PAGE,
                               V_FROM_K)
        last = ctx - 1  # the step's own row: read after the wait, one row, where this tile holds it
        mine = (last >= lo) & (last < tl.minimum(lo + BLOCK_N, hi))
        last_block = tl.load(table + tl.where(mine, last // PAGE, 0)).to(tl.int64)  # column 0 always exists
        k_last = k_ptr + last_block * stride_kb + (last % PAGE) * stride_ks + kvh * stride_kh
        enter(PDL)
        new = (pos == last)[:, None]  # masks as tl.where(mine, ...): the interpreter rejects a scalar & a vector
        k1 = tl.where(new, tl.load(k_last + d1, mask=tl.where(mine, d1_ok, False), other=0.0)[None, :], k1)
        if D2 > 0:
            k2 = tl.where(new, tl.load(k_last + D1 + d2, mask=tl.where(mine, d2_ok, False), other=0.0)[None, :], k2)
        if V_FROM_K:
            v = k1
        else:
            v_last = v_ptr + last_block * stride_vb + (last % PAGE) * stride_vs + kvh * stride_vh
            v = tl.where(new, tl.load(v_last + dv, mask=tl.where(mine, dv_ok, False), other=0.0)[None, :], v)
        q1, q2 = _queries(q_ptr, b, heads, g_ok, d1, d1_ok, d2, d2_ok, stride_qb, stride_qh, D1, D2)
        m, l, acc = _attend_tile(q1, q2, k1, k2, v, p_ok, m, l, acc, scale, D2, IEEE)
        first = lo + BLOCK_N
    else:
        q1, q2 = _queries(q_ptr, b, heads, g_ok, d1, d1_ok, d2, d2_ok, stride_qb, stride_qh, D1, D2)
    for start in range(first, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_ok = pos < hi
        block = tl.load(table + pos // PAGE, mask=p_ok, other=0).to(tl.int64)
        k1, k2, v = _tile_rows(k_ptr, v_ptr, block, pos, p_ok, kvh, d1, d1_ok, d2, d2_ok, dv, dv_ok,
                               stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, D1, D2, PAGE, V_FROM_K)
        m, l, acc = _attend_tile(q1, q2, k1, k2, v, p_ok, m, l, acc, scale, D2, IEEE)

    empty_split = l == 0.0  # a split wholly past the context (or before the window)
    out = acc / tl.where(empty_split, 1.0, l)[:, None]
    if direct != 0:  # what the merge would write from one split: its output times exp(0) / 1, the same bits
        f_rows = final_ptr + b * stride_fb + heads[:, None] * stride_fh
        tl.store(f_rows + dv[None, :], out.to(final_ptr.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])
    else:
        lse = tl.where(empty_split, float("-inf"), m + tl.log(tl.where(empty_split, 1.0, l)))
        o_rows = out_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os
        tl.store(o_rows + dv[None, :], out, mask=g_ok[:, None] & dv_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=g_ok)
        if MERGE:
            _merge_if_last(out_ptr, lse_ptr, final_ptr, counts_ptr + b * tl.num_programs(1) + hg, splits, b, heads,
                           g_ok, dv, dv_ok, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb,
                           stride_fh, BLOCK_G, WV, MAX_S)


@triton.jit
def _merge_if_last(out_ptr, lse_ptr, final_ptr, count_ptr, splits, b, heads, g_ok, dv, dv_ok,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh,
                   BLOCK_G: tl.constexpr, WV: tl.constexpr, MAX_S: tl.constexpr):
    """Count this split done; the last of its group merges the group's splits into the final output, as
    _merge_kernel does, and zeroes the count for the next call. The barrier puts every thread's stores
    before the count; the count's acquire-release atomic (GPU scope) makes them visible to the program
    that counts last, which reads the partials past L1 (.cg)."""
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if done == splits - 1:
        tl.store(count_ptr, 0)
        rows = b * stride_lb + heads * stride_lh
        t = tl.arange(0, MAX_S)
        lse = tl.load(lse_ptr + rows[:, None] + t[None, :], mask=g_ok[:, None] & (t < splits)[None, :],
                      other=float("-inf"), cache_modifier=".cg")
        top = tl.max(lse, axis=1)
        top = tl.where(top > float("-inf"), top, 0.0)
        total = tl.maximum(tl.sum(tl.exp(lse - top[:, None]), axis=1), 1e-30)  # no context: zeros, not NaN
        acc = tl.zeros([BLOCK_G, WV], dtype=tl.float32)
        o_rows = out_ptr + b * stride_ob + heads[:, None] * stride_oh + dv[None, :]
        for i in range(0, splits):
            w = tl.exp(tl.load(lse_ptr + rows + i, mask=g_ok, other=float("-inf"), cache_modifier=".cg") - top) / total
            part = tl.load(o_rows + i * stride_os, mask=g_ok[:, None] & dv_ok[None, :], other=0.0, cache_modifier=".cg")
            acc += part * w[:, None]
        f_rows = final_ptr + b * stride_fb + heads[:, None] * stride_fh
        tl.store(f_rows + dv[None, :], acc.to(final_ptr.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])


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
    """How the split kernel runs: BLOCK_N cached rows per step, warps, pipeline stages, the programs
    the splits aim for, and the fewest context positions a split takes (min_chunk; 0: one tile). A
    batch whose contexts fit in one split runs the split kernel alone, writing the output itself:
    no partial outputs, no merge launch; with fused_merge neither do several splits, the last of each
    group merging them (benchmarks/bench_decode_attention.py times the choices)."""

    block_n: int
    num_warps: int
    num_stages: int = 2
    target_programs: int = TARGET_PROGRAMS
    min_chunk: int = 0
    fused_merge: bool = False  # several splits merged by the last of them (_merge_if_last), not a merge launch


def default_launch(dk: int, dv: int, programs_per_split: int = 1) -> Launch:
    """The launch for heads of these widths, where one split of the context takes programs_per_split programs
    (sequences x KV heads x query-head blocks). MLA (576-wide latent rows): within 9% of the best at batch 1,
    16 and 64 on an H200 (benchmarks/bench_decode_attention.py, context 320; docs/benchmarks.md): fewer and
    longer splits, as each program holds the accumulators of all 16 heads, and at batch 64 the partial
    outputs of more splits cost more than they hid. Other heads: short splits where the batch alone leaves
    the GPU idle; from 256 programs a split, one split per 512 positions (so a decode graph's contexts up to
    512 are read in one program, written without the merge launch). On an H100, Qwen3-30B-A3B's heads at 300
    cached tokens in a graph's launch for 512: 25.2 -> 18.4 us at batch 64 (256 programs), and its graphed
    decode step 22.61 -> 22.34 ms (benchmarks/profile_engine.py); at batch 16 (64 programs) one split of
    128-row tiles took 11.0 us against 11.6 alone, yet the graphed step 14.85-14.86 ms against 14.83, so
    batch 16 keeps the short splits. The short splits had been within 6% of the best on an H200 at batches
    1-64 without the graph's padding."""
    if max(dk, dv) > 256:
        return Launch(32, 4, 2, 132)
    if programs_per_split >= 256:
        return Launch(64, 8, 3, 528, min_chunk=512)
    return Launch(32, 4, 3, 528, fused_merge=FUSED_MERGE)


def plan_splits(num_seqs: int, programs_per_seq: int, max_len: int, block_n: int,
                target_programs: int = TARGET_PROGRAMS, min_chunk: int = 0) -> tuple[int, int]:
    """(splits, positions per split) for a batch shape: enough programs to fill the GPU, each with at
    least one tile of BLOCK_N positions and at least min_chunk positions; a function of the shape alone
    (see the module docstring)."""
    tiles = max(1, math.ceil(max_len / block_n))
    want = math.ceil(target_programs / max(1, num_seqs * programs_per_seq))
    most = tiles // max(1, math.ceil(min_chunk / block_n))  # splits of min_chunk positions or more
    splits = max(1, min(want, most, MAX_SPLITS))
    chunk = math.ceil(tiles / splits) * block_n
    return math.ceil(max_len / chunk), chunk


_COUNTS: dict[torch.device, list[torch.Tensor]] = {}


def _split_counts(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 zeros on the device for fused_merge's split counts, which each call leaves at zero.
    Every buffer handed out is kept for the life of the process: captured graphs hold its address. Grown
    outside a CUDA graph capture only (a captured step's warm-up forward runs the same shape first)."""
    kept = _COUNTS.setdefault(device, [])
    if not kept or kept[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode attention's split counts must grow before a CUDA graph capture "
                               "(run the step once first)")
        kept.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return kept[-1]


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
    settled: bool = False,
) -> torch.Tensor:
    """q [B, Hq, Dk] over caches [blocks, block_size, Hk, Dk] / [..., Hk, Dv] -> [B, Hq, Dv] (q's dtype).

    block_tables [B, W] int32, context_lens [B] (on q's device); max_len bounds every context (the
    launch shape; larger lengths would be cut). v_cache may be a view of k_cache's leading columns
    (MLA), read then from the key tiles. Heads are split evenly: Hq a multiple of Hk.
    settled: the caller promises that context_lens, block_tables and every cached row but each
    sequence's last were written before the last kernel launched before this call (a decode step:
    the step's inputs are uploaded first, and the kernel just before writes only the new rows); the
    kernel then reads them before waiting for that kernel (pdl.py).
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
    launch = launch or default_launch(dk, dv, b * hk * g_blocks)
    block_n = launch.block_n
    splits, chunk = plan_splits(b, hk * g_blocks, max(1, max_len), block_n, launch.target_programs,
                                launch.min_chunk)
    v_from_k = (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and dv == d1)
    direct = splits == 1  # the split kernel writes `out` itself (part and lse then stay unwritten)
    merge = not direct and launch.fused_merge
    part = empty(b, hq, splits, dv, dtype=torch.float32, device=q.device)
    lse = empty(b, hq, splits, dtype=torch.float32, device=q.device)
    out = empty(b, hq, dv, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    counts = _split_counts(q.device, b * hk * g_blocks) if merge else lse
    _split_kernel[(b, hk * g_blocks, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, out, counts,
        scale, chunk, sliding_window or 0, int(direct), splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, D1=d1, D2=d2, DV=dv, W1=max(16, d1), W2=max(16, d2) if d2 else 0,
        WV=max(16, dv), BLOCK_N=block_n, PAGE=page, V_FROM_K=v_from_k,
        IEEE=q.dtype == torch.float32, SETTLED=settled, MERGE=merge, MAX_S=MAX_SPLITS, num_warps=launch.num_warps,
        num_stages=launch.num_stages, **launch_args(q),
    )
    if direct or merge:
        return out
    _merge_kernel[(b, hq)](
        part, lse, out, splits,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        DV=dv, MAX_S=MAX_SPLITS, TILE_S=16, num_warps=4, **launch_args(part),
    )
    return out
