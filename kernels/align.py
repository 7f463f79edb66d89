"""Token permutation for the grouped GEMMs (moe_align_block_size): sort (token, slot) pairs by expert.

Output layout, all on the device and sized from shapes alone (no host synchronisation):
- `sorted_ids` [max_padded] int32: flat slot indices t*k + j grouped by expert in ascending expert
  order, stable within an expert, each expert's run padded to a multiple of BLOCK_M with the
  sentinel S = T*k. Experts without pairs get no run, so their weights are never read.
- `block_expert` [max_blocks] int32: the expert of each BLOCK_M block, -1 past the last block.
- `num_padded` [1] int32: the used length of `sorted_ids`.
- `counts` [E] int32: pairs per expert (ids of -1 or >= E are counted nowhere).

Small inputs (decode) take one program that counts and scatters in registers; larger ones take a
counting launch over chunks and a scatter launch, both parallel over chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import empty

SUB = 128  # slots handled together in registers: a [SUB, E_PAD] one-hot tile
FUSED_MAX_SLOTS = 1024  # at or below this many slots one program does everything
CHUNK = 1024  # slots per program in the two-launch path


@dataclass(frozen=True)
class Alignment:
    """The permutation of one call; see the module docstring for the layout."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor
    counts: torch.Tensor
    block_m: int
    num_slots: int


def max_padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded length: each expert that has pairs adds at most block_m - 1 pads."""
    return num_slots + min(num_experts, num_slots) * (block_m - 1)


@triton.jit
def _onehot(ids_ptr, base, S, E, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """One-hot [SUB, E_PAD] of slots base..base+SUB; ids outside [0, E) match no bin."""
    offs = base + tl.arange(0, SUB)
    in_range = offs < S
    e = tl.load(ids_ptr + offs, mask=in_range, other=-1)
    e = tl.where((e >= 0) & (e < E), e, -1).to(tl.int32)
    bins = tl.arange(0, E_PAD)
    hot = (e[:, None] == bins[None, :]) & in_range[:, None]
    return offs, in_range, hot.to(tl.int32)


@triton.jit
def _count_kernel(ids_ptr, chunk_counts_ptr, rank_ptr, S, E,
                  CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """Per chunk: pairs per expert, and each slot's rank among same-expert slots of the chunk."""
    c = tl.program_id(0)
    running = tl.zeros([E_PAD], dtype=tl.int32)
    for s in range(CHUNK // SUB):
        offs, in_range, hot = _onehot(ids_ptr, c * CHUNK + s * SUB, S, E, SUB, E_PAD)
        before = tl.cumsum(hot, axis=0) - hot + running[None, :]
        rank = tl.sum(hot * before, axis=1)
        tl.store(rank_ptr + offs, rank, mask=in_range)
        running += tl.sum(hot, axis=0)
    tl.store(chunk_counts_ptr + c * E_PAD + tl.arange(0, E_PAD), running)


@triton.jit
def _scatter_kernel(ids_ptr, chunk_counts_ptr, rank_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                    counts_ptr, S, E, num_chunks, max_blocks,
                    FUSED: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    c = tl.program_id(0)
    bins = tl.arange(0, E_PAD)
    real = bins < E
    # Totals per expert, and the pairs of each expert held by earlier chunks.
    if FUSED:
        total = tl.zeros([E_PAD], dtype=tl.int32)
        for s in range(tl.cdiv(S, SUB)):
            _, _, hot = _onehot(ids_ptr, s * SUB, S, E, SUB, E_PAD)
            total += tl.sum(hot, axis=0)
        earlier = tl.zeros([E_PAD], dtype=tl.int32)
    else:
        total = tl.zeros([E_PAD], dtype=tl.int32)
        earlier = tl.zeros([E_PAD], dtype=tl.int32)
        for i in range(num_chunks):
            cc = tl.load(chunk_counts_ptr + i * E_PAD + bins)
            total += cc
            earlier += tl.where(i < c, cc, 0)
    total = tl.where(real, total, 0)
    padded = tl.cdiv(total, BLOCK_M) * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    num_padded = tl.sum(padded, axis=0)

    # Scatter this program's slots to their padded positions.
    if FUSED:
        running = tl.zeros([E_PAD], dtype=tl.int32)
        for s in range(tl.cdiv(S, SUB)):
            offs, in_range, hot = _onehot(ids_ptr, s * SUB, S, E, SUB, E_PAD)
            before = tl.cumsum(hot, axis=0) - hot + running[None, :]
            pos = tl.sum(hot * (before + pad_start[None, :]), axis=1)
            ok = in_range & (tl.sum(hot * real[None, :].to(tl.int32), axis=1) > 0)
            tl.store(sorted_ptr + pos, offs, mask=ok)
            running += tl.sum(hot, axis=0)
    else:
        for s in range(CHUNK // SUB):
            offs, in_range, hot = _onehot(ids_ptr, c * CHUNK + s * SUB, S, E, SUB, E_PAD)
            rank = tl.load(rank_ptr + offs, mask=in_range, other=0)
            pos = rank + tl.sum(hot * (earlier + pad_start)[None, :], axis=1)
            ok = in_range & (tl.sum(hot * real[None, :].to(tl.int32), axis=1) > 0)
            tl.store(sorted_ptr + pos, offs, mask=ok)

    # Block -> expert map and the sentinel in every padding position; blocks are shared out
    # among the programs.
    if c == 0:
        tl.store(num_padded_ptr, num_padded)
        tl.store(counts_ptr + bins, total, mask=real)
    blocks_per_prog = tl.cdiv(max_blocks, tl.num_programs(0))
    rows = tl.arange(0, BLOCK_M)
    for b0 in range(c * blocks_per_prog, (c + 1) * blocks_per_prog, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = (b < max_blocks) & (b < (c + 1) * blocks_per_prog)
        start = b * BLOCK_M
        # Expert e owns the block when pad_start[e] <= start < pad_end[e].
        owns = (pad_start[None, :] <= start[:, None]) & (start[:, None] < pad_end[None, :]) & real[None, :]
        used = start < num_padded
        expert = tl.sum(tl.where(owns, bins[None, :], 0), axis=1)
        tl.store(block_expert_ptr + b, tl.where(used, expert, -1), mask=b_ok)
        seg_start = tl.sum(tl.where(owns, pad_start[None, :], 0), axis=1)
        seg_count = tl.sum(tl.where(owns, total[None, :], 0), axis=1)
        p = start[:, None] + rows[None, :]
        is_pad = (p - seg_start[:, None]) >= seg_count[:, None]
        tl.store(sorted_ptr + p, tl.zeros_like(p) + S, mask=b_ok[:, None] & is_pad)


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the (token, slot) pairs of topk_ids [T, k] by expert into BLOCK_M-aligned runs."""
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    s = ids.numel()
    dev = ids.device
    max_padded = max(max_padded_slots(s, num_experts, block_m), block_m)
    max_blocks = triton.cdiv(max_padded, block_m)
    max_padded = max_blocks * block_m
    sorted_ids = empty(max_padded, dtype=torch.int32, device=dev)
    block_expert = empty(max_blocks, dtype=torch.int32, device=dev)
    num_padded = empty(1, dtype=torch.int32, device=dev)
    counts = empty(num_experts, dtype=torch.int32, device=dev)
    e_pad = triton.next_power_of_2(num_experts)
    sub = min(SUB, max(16, 8192 // e_pad))
    block_b = max(1, min(64, 4096 // block_m))
    if s <= FUSED_MAX_SLOTS:
        _scatter_kernel[(1,)](
            ids, ids, ids, sorted_ids, block_expert, num_padded, counts, s, num_experts, 1, max_blocks,
            FUSED=True, CHUNK=SUB, SUB=sub, E_PAD=e_pad, BLOCK_M=block_m, BLOCK_B=block_b, num_warps=4,
        )
    else:
        num_chunks = triton.cdiv(s, CHUNK)
        chunk_counts = empty(num_chunks, e_pad, dtype=torch.int32, device=dev)
        rank = empty(s, dtype=torch.int32, device=dev)
        _count_kernel[(num_chunks,)](ids, chunk_counts, rank, s, num_experts,
                                     CHUNK=CHUNK, SUB=sub, E_PAD=e_pad, num_warps=4)
        _scatter_kernel[(num_chunks,)](
            ids, chunk_counts, rank, sorted_ids, block_expert, num_padded, counts, s, num_experts,
            num_chunks, max_blocks,
            FUSED=False, CHUNK=CHUNK, SUB=sub, E_PAD=e_pad, BLOCK_M=block_m, BLOCK_B=block_b, num_warps=4,
        )
    return Alignment(sorted_ids, block_expert, num_padded, counts, block_m, s)
