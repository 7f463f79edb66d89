"""Attention for prefill chunks in one padded call per layer, not one call per sequence.

The per-sequence loop (paged_attention.py) costs some fifteen kernel launches per sequence per
layer; a step that prefills 32 prompts on a GPU spent most of its time launching them. Here the
step's queries are laid out [B, Lq] (each sequence's new tokens, padded to the longest chunk) and
its keys [B, Lk] (each context, padded to the longest), and one masked attention covers the step:
query i of sequence b sees keys j <= its position (within the sliding window). Padding queries are
dropped on the way back to the packed rows; padding keys are masked.

The layout is built once per step on the device from three small host lists (query lengths,
context lengths, row offsets) and kept on the AttentionBatch for every layer. Steps whose padded
score matrix or padded keys would be very large (one long context beside many short ones) keep the
per-sequence loop, which reads each sequence's own context only.

A mixed step (decodes beside prefill chunks) is split first (`split_mixed`): its decodes go to the
paged decode path, and only its chunks are padded here, among themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from ..batch import AttentionBatch
from . import decode_attention

MAX_SCORE_ELEMENTS = 1 << 28  # B * Lq * Lk * heads above which the per-sequence loop is used


@dataclass
class PaddedLayout:
    q_index: torch.Tensor  # [B, Lq] packed row of each sequence's i-th new token (0 for padding)
    out_index: torch.Tensor  # [T] where each packed row sits in the flattened [B * Lq]
    q_pos: torch.Tensor  # [B, Lq] position of each query in its sequence (padding: the last real one)
    num_keys: int  # Lk


def fits(batch: AttentionBatch, heads: int, key_bytes: int) -> bool:
    """Whether the padded call stays small: its score matrix, and the keys/values it materialises
    (`key_bytes` per padded key slot) within decode_attention.MAX_GATHER_BYTES."""
    return fits_shape(batch.num_seqs, max(batch.query_lens), max(batch.context_lens), heads, key_bytes)


def fits_shape(num_seqs: int, queries: int, keys: int, heads: int, key_bytes: int) -> bool:
    """fits() for num_seqs sequences padded to `queries` new tokens over `keys` keys each."""
    return (num_seqs * queries * keys * heads <= MAX_SCORE_ELEMENTS
            and num_seqs * keys * key_bytes <= decode_attention.MAX_GATHER_BYTES)


def layout(batch: AttentionBatch, device: torch.device) -> PaddedLayout:
    memo = batch.__dict__.setdefault("_padded_layout", {})
    if device not in memo and batch.chunk_plan is not None:
        memo[device] = _planned_layout(batch, device)
    if device not in memo:
        b, lq, lk, t = batch.num_seqs, max(batch.query_lens), max(batch.context_lens), batch.num_tokens
        starts, acc = [], 0
        for q in batch.query_lens:
            starts.append(acc)
            acc += q
        host = torch.tensor([batch.query_lens, batch.context_lens, starts], dtype=torch.long)
        if device.type == "cuda":
            host = host.pin_memory().to(device, non_blocking=True)
        q_lens, ctx_lens, first = host[0], host[1], host[2]
        ar_q = torch.arange(lq, device=device)[None, :]
        valid = ar_q < q_lens[:, None]
        q_index = torch.where(valid, first[:, None] + ar_q, 0)
        q_pos = torch.where(valid, (ctx_lens - q_lens)[:, None] + ar_q, (ctx_lens - 1)[:, None])
        seq_of_row = torch.repeat_interleave(torch.arange(b, device=device), q_lens, output_size=t)
        out_index = seq_of_row * lq + torch.arange(t, device=device) - first[seq_of_row]
        memo[device] = PaddedLayout(q_index, out_index, q_pos, lk)
    return memo[device]


def _planned_layout(batch: AttentionBatch, device: torch.device) -> PaddedLayout:
    """The layout of a fixed-shape chunk step (AttentionBatch.chunk_plan, padded_len set), built on the device
    from its plan, so a captured step replays it for any chunks: the rows are already padded (sequence i's
    chunk from row i * Lq), so queries and outputs keep their rows; keys are padded_len per sequence. Padding
    queries (past a chunk, or of a sequence holding none) sit at their chunk's last position, or at key 0:
    each sees some key, so its (never used) output stays finite."""
    b, lq = batch.num_seqs, batch.query_lens[0]
    if batch.padded_len is None:
        raise ValueError("a chunk step laid out padded needs padded_len (the keys read per sequence)")
    seq = batch.chunk_plan[:3 * b].view(b, 3).to(device=device, dtype=torch.long)
    q_lens, ctx_lens = seq[:, 1], seq[:, 2]
    ar_q = torch.arange(lq, device=device)[None, :]
    q_pos = torch.where(ar_q < q_lens[:, None], (ctx_lens - q_lens)[:, None] + ar_q, (ctx_lens - 1).clamp(min=0)[:, None])
    rows = torch.arange(b * lq, device=device)
    return PaddedLayout(rows.view(b, lq), rows, q_pos, batch.padded_len)


def mask(batch: AttentionBatch, device: torch.device, sliding_window: int | None, group: int = 1,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, 1, group * Lq, Lk] True where each query may attend (for `group` query heads per KV head,
    laid side by side as attend_padded lays them); with `dtype`, the same as an additive bias (0 or
    -inf), which SDPA would otherwise make from the boolean mask in every layer. Built once per step."""
    masks = batch.__dict__.setdefault("_padded_masks", {})
    key = (device, sliding_window, group, dtype)
    if key in masks:
        return masks[key]
    if dtype is not None:
        allowed = mask(batch, device, sliding_window, group)
        masks[key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    elif group > 1:
        masks[key] = mask(batch, device, sliding_window).repeat(1, 1, group, 1)
    else:
        lay = layout(batch, device)
        pos = lay.q_pos[:, :, None]
        k = torch.arange(lay.num_keys, device=device)[None, None, :]
        m = k <= pos
        if sliding_window is not None:
            m &= k > pos - sliding_window
        masks[key] = m[:, None]
    return masks[key]


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, lay: PaddedLayout,
                  attn_mask: torch.Tensor) -> torch.Tensor:
    """Packed queries q [T, Hq, D] over padded k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] -> packed [T, Hq, Dv];
    attn_mask from mask(..., group=Hq // Hk).

    With several query heads per KV head (GQA, MLA's absorbed latent) each KV head's query heads are
    laid end to end as one longer query [B, Hk, G * Lq, D]: an ordinary attention any backend runs
    (with a mask, SDPA's enable_gqa leaves only its slow math path, which repeats every key G times).
    """
    b, lq = lay.q_index.shape
    hq, hk, dv = q.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    if attn_mask.shape[2] != g * lq:
        raise ValueError(f"attention mask for {attn_mask.shape[2] // lq} query heads per KV head, not {g}: "
                         f"build it with mask(..., group={g})")
    qp = q[lay.q_index]  # [B, Lq, Hq, D]
    qp = qp.view(b, lq, hk, g, -1).permute(0, 2, 3, 1, 4).reshape(b, hk, g * lq, -1) if g > 1 else qp.transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale)
    out = out.view(b, hk, g, lq, dv).permute(0, 3, 1, 2, 4) if g > 1 else out.transpose(1, 2)
    return out.reshape(b * lq, hq, dv).index_select(0, lay.out_index)


@dataclass
class Part:
    """Some of a step's sequences: their rows in the step's flat batch, and a batch of them alone."""

    rows: torch.Tensor  # [n] int64, on the model's device
    batch: AttentionBatch


def split_mixed(batch: AttentionBatch, device: torch.device) -> tuple[Part, Part] | None:
    """A step with both decodes (one new token) and prefill chunks, as (decodes, prefills); None for a
    step of one kind or a fixed-shape step. Attended as one padded call, every decode's single query
    would be padded to the longest chunk (63 decodes beside one 256-token chunk: 64 x 256 query rows
    for 319 real ones); apart, the decodes read the cache in place (paged decode attention) and the
    chunks pad only among themselves. Built once per step, kept on the batch for every layer."""
    if batch.padded_len is not None or batch.fresh or batch.chunk_plan is not None:
        return None
    memo = batch.__dict__.setdefault("_mixed_split", {})
    if device not in memo:
        decodes = [i for i, q in enumerate(batch.query_lens) if q == 1]
        if not decodes or len(decodes) == batch.num_seqs:
            memo[device] = None
        else:
            chunks = [i for i, q in enumerate(batch.query_lens) if q != 1]
            starts = [0, *accumulate(batch.query_lens)]
            memo[device] = tuple(_part(batch, seqs, starts, device) for seqs in (decodes, chunks))
    return memo[device]


def _part(batch: AttentionBatch, seqs: list[int], starts: list[int], device: torch.device) -> Part:
    rows = [r for i in seqs for r in range(starts[i], starts[i] + batch.query_lens[i])]
    host = torch.tensor(rows, dtype=torch.int64)
    rows_t = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    index = torch.tensor(seqs, dtype=torch.int64)
    tables = batch.block_tables.index_select(0, index.to(batch.block_tables.device, non_blocking=True))
    slots = batch.slot_mapping.index_select(0, rows_t.to(batch.slot_mapping.device))
    sub = AttentionBatch(query_lens=[batch.query_lens[i] for i in seqs],
                         context_lens=[batch.context_lens[i] for i in seqs],
                         block_tables=tables, slot_mapping=slots, block_size=batch.block_size)
    return Part(rows_t, sub)


def unplan(batch: AttentionBatch) -> Part:
    """The real chunks of a fixed-shape chunk step (AttentionBatch.chunk_plan), read back from its plan on
    the host: their rows among the padded ones, and a batch of them alone, as an eager step has them.
    For the padded step without capture (CPU), whose attention then is the eager step's."""
    plan = batch.chunk_plan.tolist()
    rows, query_lens, context_lens, seqs = [], [], [], []
    for i in range(batch.num_seqs):
        first, q_len, ctx = plan[3 * i:3 * i + 3]
        if q_len:
            rows += range(first, first + q_len)
            query_lens.append(q_len)
            context_lens.append(ctx)
            seqs.append(i)
    device = batch.slot_mapping.device
    rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
    tables = batch.block_tables.index_select(0, torch.tensor(seqs, dtype=torch.int64, device=batch.block_tables.device))
    return Part(rows_t, AttentionBatch(query_lens=query_lens, context_lens=context_lens, block_tables=tables,
                                       slot_mapping=batch.slot_mapping.index_select(0, rows_t),
                                       block_size=batch.block_size))
