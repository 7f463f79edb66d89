"""Triton paged prefill attention: prompt chunks attend over the paged KV cache in place.

The plain path (models/layers/padded_attention.py) copies every context of a prefill step into a
padded [B, Lk] tensor, casts it, and runs SDPA with a [B, Lq, Lk] mask; its cost grows with the
longest context times the number of sequences, and every new step shape is a new SDPA problem.
Here each program walks one sequence's block table itself, flash-attention style:

- grid (query tile, query head): a tile is BLOCK_M consecutive new tokens of one sequence (the
  host lists the tiles of the step: sequence index and first token);
- the program reads cached keys from position 0 (or the sliding window's start) up to its last
  query's position, BLOCK_N at a time, scores them with a tensor-core dot in float32, masks the
  causal and window bounds by absolute position, keeps an online softmax and accumulates the values;
- chunks of any length beside any cached prefix: token i of a chunk of q_len tokens in a context of
  ctx tokens sits at position ctx - q_len + i, and its keys (its own included) are already written.

GQA reads the KV head of its query head's group. Head widths are powers of two of at least 16 (the
GQA models' 64-256); others stay on the plain path (`supports`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty
from .pdl import enter, launch_args

BLOCK_M = 64
BLOCK_N = 64


@triton.jit(do_not_specialize=["num_seqs", "window", "stride_tb"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, plan_ptr, num_seqs,
    scale, window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    enter(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    # plan: [first row, query_len, context_len] per sequence, then [sequence, first token] per tile
    seq = tl.load(plan_ptr + 3 * num_seqs + 2 * t)
    m0 = tl.load(plan_ptr + 3 * num_seqs + 2 * t + 1)
    first = tl.load(plan_ptr + 3 * seq)
    q_len = tl.load(plan_ptr + 3 * seq + 1)
    ctx = tl.load(plan_ptr + 3 * seq + 2)
    cached = ctx - q_len

    rows = m0 + tl.arange(0, BLOCK_M)
    r_ok = rows < q_len
    q_pos = cached + rows
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q = tl.load(q_ptr + (first + rows).to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=r_ok[:, None], other=0.0)

    hi = tl.minimum(cached + m0 + BLOCK_M, ctx)  # past the tile's last query: nothing it may see
    hi = tl.where(m0 < q_len, hi, 0)  # a fixed plan's tile past its sequence's chunk: no query at all
    lo = 0
    if window > 0:
        lo = tl.maximum(cached + m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_ok = pos < hi
        block = tl.load(table + pos // PAGE, mask=p_ok, other=0).to(tl.int64)
        slot = pos % PAGE
        k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=p_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = p_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if window > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh + dv[None, :],
                    mask=p_ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = out_ptr + (first + rows).to(tl.int64)[:, None] * stride_ot + h * stride_oh
    tl.store(o_rows + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])


def supports(head_dim: int, value_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the kernel takes these heads: widths powers of two of 16 or more, whole GQA groups."""
    def pow2(n: int) -> bool:
        return n >= 16 and n & (n - 1) == 0
    return pow2(head_dim) and pow2(value_dim) and num_heads % num_kv_heads == 0


def make_plan(query_lens: list[int], context_lens: list[int], block_m: int = BLOCK_M) -> tuple[list[int], int]:
    """The launch plan as host integers: per sequence [first row, query_len, context_len], then per
    query tile [sequence, first token]; and the number of tiles."""
    seqs, tiles, first = [], [], 0
    for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        if not 0 < q_len <= ctx:
            raise ValueError(f"sequence {i}: query_len={q_len} must be in [1, context_len={ctx}]")
        seqs += [first, q_len, ctx]
        for m0 in range(0, q_len, block_m):
            tiles += [i, m0]
        first += q_len
    return seqs + tiles, len(tiles) // 2


_last_plan: tuple | None = None  # (lengths and device, plan on the device, tiles, its pinned host copy)


def _device_plan(query_lens: list[int], context_lens: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """make_plan's plan on the device, and its tile count. An eager step's layers attend the same chunks one after
    another, so the last plan is kept and the step's other layers reuse it: one plan built and copied up a
    step instead of one a layer (building it took 21 us for 16 sequences on a CI machine's CPU, before the copy)."""
    global _last_plan
    key = (device, tuple(query_lens), tuple(context_lens))
    last = _last_plan
    if last is None or last[0] != key:
        host, tiles = make_plan(query_lens, context_lens)
        pinned = device.type == "cuda"
        staged = torch.tensor(host, dtype=torch.int32, pin_memory=pinned)
        last = (key, staged.to(device, non_blocking=True) if pinned else staged, tiles, staged)
        _last_plan = last
    return last[1], last[2]


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    plan: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] (the step's new tokens, sequence after sequence) over caches [blocks, page, Hk, D]
    / [..., Hk, Dv], each sequence's KV (the chunk's own included) already written, through
    block_tables [B, W] -> [T, Hq, Dv] in q's dtype. Causal by absolute position, within the window.
    `plan`: a fixed_plan already on the device (a CUDA graph's step, whose lengths change between
    replays); query_lens then only give the sequences' padded rows, and rows no chunk holds are not
    written."""
    t, hq, dk = q.shape
    _nb, page, hk, dk_cache = k_cache.shape
    dv = v_cache.shape[-1]
    if dk_cache != dk or v_cache.shape[:3] != k_cache.shape[:3] or not supports(dk, dv, hq, hk):
        raise ValueError(f"prefill attention does not take q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)} (head widths powers of two >= 16, Hq a multiple of Hk)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("prefill attention needs q and the caches contiguous in their last dimension")
    if sum(query_lens) != t:
        raise ValueError(f"query_lens sum to {sum(query_lens)} but q has {t} rows")
    out = empty(t, hq, dv, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    if plan is not None:
        plan_t, tiles = plan, fixed_tiles(query_lens)
    else:
        plan_t, tiles = _device_plan(query_lens, context_lens, q.device)
    _prefill_kernel[(tiles, hq)](
        q, k_cache, v_cache, out, block_tables, plan_t, len(query_lens),
        scale, sliding_window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=hq // hk, D=dk, DV=dv, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PAGE=page,
        IEEE=q.dtype == torch.float32,
        num_warps=4 if max(dk, dv) <= 64 else 8, num_stages=2, **launch_args(q),
    )
    return out


def fixed_tiles(padded_lens: list[int], block_m: int = BLOCK_M) -> int:
    """Tiles of a fixed plan: every sequence's padded rows, BLOCK_M at a time."""
    return sum(-(-n // block_m) for n in padded_lens)


def fixed_plan_size(padded: int, num_seqs: int, block_m: int = BLOCK_M) -> int:
    """The length of fixed_plan's list for this shape."""
    return 3 * num_seqs + 2 * fixed_tiles([padded] * num_seqs, block_m)


def fixed_plan(padded: int, query_lens: list[int], context_lens: list[int], num_seqs: int,
               block_m: int = BLOCK_M) -> list[int]:
    """A launch plan of fixed shape (num_seqs sequences of `padded` rows each, back to back) for chunks of
    query_lens[i] <= padded new tokens in contexts of context_lens[i]: the grid and the tile list depend on
    the shape alone, only the lengths change, so a captured step replays it for any chunks that fit. The
    sequences past len(query_lens) hold nothing (query and context 0); a tile past its chunk reads nothing."""
    if len(query_lens) > num_seqs or len(context_lens) != len(query_lens):
        raise ValueError(f"{len(query_lens)} chunks ({len(context_lens)} contexts) for {num_seqs} sequences")
    seqs, tiles = [], []
    for i in range(num_seqs):
        q_len, ctx = (query_lens[i], context_lens[i]) if i < len(query_lens) else (0, 0)
        if i < len(query_lens) and not 0 < q_len <= min(ctx, padded):
            raise ValueError(f"sequence {i}: query_len={q_len} must be in [1, min(context_len={ctx}, {padded})]")
        seqs += [i * padded, q_len, ctx]
        for m0 in range(0, padded, block_m):
            tiles += [i, m0]
    return seqs + tiles
