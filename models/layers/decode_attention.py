"""Helpers of a decode-only step (one new token per sequence), attended in one call for the batch.

GQA and MLA's absorbed path call kernels.ops.paged_decode_attention, which reads each sequence's
cache in place through its block table (a Triton kernel on CUDA, a padded gather on CPU); the
lengths cross to the device once per step (`decode_lens`). What remains here serves MLA's expanded
path for contexts of a token or two, and the padded gather that prefill steps share.
"""

from __future__ import annotations

import torch

from ..batch import AttentionBatch


MAX_GATHER_BYTES = 1 << 29  # one layer's padded gather above which decode attends sequence by sequence


def is_decode_only(batch: AttentionBatch) -> bool:
    return all(q == 1 for q in batch.query_lens)


def gather_bytes(num_seqs: int, padded_len: int, cache: torch.Tensor) -> int:
    """Bytes one layer's padded gather of `cache` [blocks, block_size, ...] takes for this step."""
    return num_seqs * padded_len * cache[0, 0].numel() * cache.element_size()


def batched_fits(batch: AttentionBatch, cache: torch.Tensor) -> bool:
    """Whether the batched decode path's gather stays small: long contexts beside many sequences
    would pad every one of them to the longest, so such steps go sequence by sequence instead."""
    fits = gather_bytes(batch.num_seqs, batch.padded_len or max(batch.context_lens), cache) <= MAX_GATHER_BYTES
    if not fits and batch.padded_len is not None:
        raise ValueError(f"a fixed-shape decode step of {batch.num_seqs} x {batch.padded_len} slots is beyond "
                         f"MAX_GATHER_BYTES; its maker must not build it (router/cuda_graphs.py checks)")
    return fits


def gather_padded(cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """Every sequence's cached entries, padded to the longest context: [B, L, ...] (padding is masked)."""
    return cache.view(-1, *cache.shape[2:])[_padded_slots(batch, cache.device)]


def _padded_slots(batch: AttentionBatch, device: torch.device) -> torch.Tensor:
    """[B, L] cache slots of every sequence's context; computed once per step, shared by all layers."""
    memo = batch.__dict__.setdefault("_decode_slots", {})
    if device not in memo:
        bs = batch.block_size
        longest = batch.padded_len or max(batch.context_lens)
        blocks = batch.block_tables[:, : (longest + bs - 1) // bs].to(device=device, dtype=torch.long)
        offsets = torch.arange(bs, device=device)
        memo[device] = (blocks[:, :, None] * bs + offsets).reshape(blocks.shape[0], -1)[:, :longest]
    return memo[device]


def decode_lens(batch: AttentionBatch, device: torch.device) -> tuple[torch.Tensor, int]:
    """(context lengths [B] on the device, the launch length bounding them) for a decode step: the
    graph path's device tensor and padded length, or the host lists copied once per step (pinned,
    without waiting for the GPU) and kept on the batch for every layer."""
    longest = batch.padded_len or max(batch.context_lens)
    if batch.context_lens_tensor is not None:
        return batch.context_lens_tensor, longest
    memo = batch.__dict__.setdefault("_decode_lens", {})
    if device not in memo:
        lens = torch.tensor(batch.context_lens, dtype=torch.int32)
        memo[device] = lens.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else lens.to(device)
    return memo[device], longest


def decode_mask(batch: AttentionBatch, device: torch.device, sliding_window: int | None) -> torch.Tensor:
    """[B, 1, 1, L] True where each sequence's one query may attend (its context, within the window).

    Built once per step and kept on the batch: every layer reuses it, and the lengths cross to the
    device once, from pinned memory, without waiting for the GPU.
    """
    masks = batch.__dict__.setdefault("_decode_masks", {})
    key = (device, sliding_window)
    if key not in masks:
        lens, longest = decode_lens(batch, device)
        pos = torch.arange(longest, device=device)[None, :]
        mask = pos < lens[:, None]
        if sliding_window is not None:
            mask &= pos >= lens[:, None] - sliding_window
        masks[key] = mask[:, None, None, :]
    return masks[key]


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D] over k [B, Hk, L, D], v [B, Hk, L, Dv] (head-major) with mask [B, 1, 1, L] -> [B, Hq, Dv].

    Two batched matmuls with the query heads of each KV head side by side, not SDPA: with a mask and
    Hq != Hk (GQA, and MLA's one latent head) SDPA falls back to its math path, which first repeats
    every cached key and value Hq/Hk times, moving far more memory than the cache itself.
    """
    b, hq, d = q.shape
    hk = k.shape[1]
    qg = q.view(b, hk, hq // hk, d)
    # Scores in float32, as SDPA and flash kernels keep them: a bf16 product would round every logit
    # to ~3 digits before the softmax (several % error on heads with large logits).
    scores = torch.matmul(qg.float(), k.transpose(-1, -2).float()) * scale  # [B, Hk, G, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, hq, v.shape[-1])  # [B, Hk, G, Dv] -> [B, Hq, Dv]

