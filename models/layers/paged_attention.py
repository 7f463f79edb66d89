"""Paged KV cache access over an AttentionBatch, in plain torch (the CPU path and the oracle).

A cache is one tensor [num_blocks, block_size, ...] per layer. New entries go to
`batch.slot_mapping`; each sequence then reads its first `context_len` slots through its block
table. Queries are the last `query_len` tokens of their sequence, so token j of the chunk sees
the cached prefix plus chunk tokens 0..j (and, with a sliding window, only the last `window`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..batch import AttentionBatch


def check_block_size(cache: torch.Tensor, batch: AttentionBatch) -> None:
    """The step's slots address blocks of the size the cache [num_blocks, block_size, ...] was allocated with."""
    if cache.shape[1] != batch.block_size:
        raise ValueError(f"batch.block_size={batch.block_size} but the KV cache was allocated with {cache.shape[1]}")


def read_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The entries of cache [num_blocks, block_size, ...] at flat slots [N] (as the step's slot_mapping addresses them)."""
    return cache.view(-1, *cache.shape[2:]).index_select(0, slots)


def sequences(batch: AttentionBatch) -> Iterator[tuple[int, slice, int, int]]:
    """(sequence index, its rows in the flat batch, query_len, context_len) for each sequence."""
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if not 0 < q_len <= ctx_len:
            raise ValueError(f"sequence {i}: query_len={q_len} must be in [1, context_len={ctx_len}]")
        yield i, slice(start, start + q_len), q_len, ctx_len
        start += q_len
    if start != batch.num_tokens:
        raise ValueError(f"query_lens sum to {start} but the batch has {batch.num_tokens} slots")


def gather_cache(cache: torch.Tensor, batch: AttentionBatch, seq: int, ctx_len: int) -> torch.Tensor:
    """The first ctx_len cached entries of sequence `seq`, in token order: [ctx_len, ...]."""
    bs = batch.block_size
    n_blocks = (ctx_len + bs - 1) // bs
    blocks = batch.block_tables[seq, :n_blocks].to(device=cache.device, dtype=torch.long)
    slots = (blocks[:, None] * bs + torch.arange(bs, device=cache.device)[None, :]).reshape(-1)[:ctx_len]
    return cache.view(-1, *cache.shape[2:])[slots]


def attention_mask(q_len: int, ctx_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [q_len, ctx_len] mask (True = attend), or None when every key is visible."""
    cached = ctx_len - q_len
    if q_len == 1 and (sliding_window is None or ctx_len <= sliding_window):
        return None
    q_pos = torch.arange(cached, ctx_len, device=device)[:, None]
    k_pos = torch.arange(ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of q [q_len, Hq, D] over k [n, Hk, D], v [n, Hk, Dv] -> [q_len, Hq, Dv]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seq_len: int,
                 sliding_window: int | None) -> torch.Tensor:
    """Causal attention of a fresh-prompt step (AttentionBatch.fresh): rows are sequences of
    `seq_len` tokens back to back, each attending its own keys only. q [B*L, Hq, D], k [B*L, Hk, D],
    v [B*L, Hk, Dv] -> [B*L, Hq, Dv]."""
    b = q.shape[0] // seq_len
    qs, ks, vs = (t.view(b, seq_len, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    if q.is_cuda and sliding_window is None:
        # No mask tensor: causal, and the key/value heads repeated for each query head, so that SDPA
        # takes a fused kernel (flash; memory-efficient where the values are narrower than the queries,
        # as MLA's are) instead of its float32 math path, which took about 55 us a layer of a 256-token
        # Qwen3-30B-A3B prompt on an H200 (docs/benchmarks.md, fourteenth session).
        group = q.shape[1] // k.shape[1]
        if group > 1:
            ks, vs = (t.repeat_interleave(group, dim=1) for t in (ks, vs))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
    else:
        mask = attention_mask(seq_len, seq_len, sliding_window, q.device)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[-1])
