"""Token permutation for the grouped GEMMs (moe_align_block_size): sort (token, slot) pairs by expert.

Output layout, all on the device and sized from shapes alone (no host synchronisation):
- `sorted_ids` [max_padded] int32: flat slot indices t*k + j grouped by expert in ascending expert
  order, stable within an expert, each expert's run padded to a multiple of BLOCK_M with the
  sentinel S = T*k. Experts without pairs get no run, so their weights are never read.
- `block_expert` [max_blocks] int32: the expert of each BLOCK_M block, -1 past the last block.
- `num_padded` [1] int32: the used length of `sorted_ids`.
- `counts` [E] int32: pairs per expert (ids of -1 or >= E are counted nowhere).

Up to FUSED_MAX_SLOTS slots, one launch: one program per expert places that expert's slots (a
running count over the slots keeps them in order), learning every expert's total from a histogram of
all slots. Beyond that a counting launch first writes per-chunk counts, and the placing launch has
one program per expert and chunk of CHUNK slots, each starting its running count at the expert's
slots in earlier chunks: the serial scan of a program stays CHUNK long at any batch size (at 32768
slots one program per expert walking them all took ~45 us on an H200). One more program fills the
unused tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import empty
from .pdl import enter, launch_args

SCAN = 1024  # slots one program compares against its expert per step
FUSED_MAX_SLOTS = 4096  # up to here each program counts every expert itself: one launch
CHUNK = 4096  # slots per counting program beyond that
TAIL_BLOCK = 1024  # positions the tail program fills per step


@dataclass(frozen=True)
class Alignment:
    """The permutation of one call; see the module docstring for the layout."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor
    counts: torch.Tensor
    block_m: int
    num_slots: int


def counting_plan(num_slots: int) -> tuple[bool, int]:
    """(fused, num_chunks): each program counts every slot itself (one launch), or a counting launch
    of num_chunks programs of CHUNK slots first. Its power-of-two round-up is a constexpr of the
    scatter kernel: a new one means a new compile."""
    fused = num_slots <= FUSED_MAX_SLOTS
    return fused, 1 if fused else triton.cdiv(num_slots, CHUNK)


def max_padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded length: each expert that has pairs adds at most block_m - 1 pads."""
    return num_slots + min(num_experts, num_slots) * (block_m - 1)


@triton.jit
def _histogram(ids_ptr, base, S, E, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """Pairs per expert among slots base..base+BLOCK ([E_PAD] int32); ids outside [0, E) count nowhere."""
    offs = base + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + offs, mask=offs < S, other=-1)
    held = (e >= 0) & (e < E) & (offs < S)
    # Bins E_PAD.. collect the rest (histogram needs every value inside its range).
    h = tl.histogram(tl.where(held, e, E_PAD).to(tl.int32), 2 * E_PAD)
    rows = tl.reshape(h, (2, E_PAD))
    return tl.sum(tl.where((tl.arange(0, 2) == 0)[:, None], rows, 0), axis=0)


@triton.jit(do_not_specialize=["S", "E"])
def _count_kernel(ids_ptr, chunk_counts_ptr, S, E, CHUNK: tl.constexpr, SCAN: tl.constexpr, E_PAD: tl.constexpr,
                  PDL: tl.constexpr):
    """Pairs per expert of one chunk of slots."""
    enter(PDL)
    c = tl.program_id(0)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for s0 in range(0, CHUNK, SCAN):
        total += _histogram(ids_ptr, c * CHUNK + s0, S, E, SCAN, E_PAD)
    tl.store(chunk_counts_ptr + c * E_PAD + tl.arange(0, E_PAD), total)


@triton.jit(do_not_specialize=["S", "E", "num_chunks", "max_padded"])
def _scatter_kernel(ids_ptr, chunk_counts_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, counts_ptr,
                    S, E, num_chunks, max_padded,
                    FUSED: tl.constexpr, SCAN: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr,
                    NC_PAD: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (e < E, c) places expert e's slots of chunk c (stable; FUSED: one chunk, every slot) and,
    for c == 0, its padding and its blocks; program (E, 0) fills everything past the used length and
    writes the totals."""
    enter(PDL)
    e = tl.program_id(0)
    c = tl.program_id(1)
    bins = tl.arange(0, E_PAD)
    if FUSED:
        total = tl.zeros([E_PAD], dtype=tl.int32)
        for s0 in range(0, S, SCAN):
            total += _histogram(ids_ptr, s0, S, E, SCAN, E_PAD)
        before = tl.zeros([E_PAD], dtype=tl.int32)
        lo = 0
        hi = S
    else:
        chunks = tl.arange(0, NC_PAD)
        cc = tl.load(chunk_counts_ptr + chunks[:, None] * E_PAD + bins[None, :],
                     mask=(chunks < num_chunks)[:, None], other=0)
        total = tl.sum(cc, axis=0)
        before = tl.sum(tl.where((chunks < c)[:, None], cc, 0), axis=0)  # each expert's slots in earlier chunks
        lo = c * CHUNK
        hi = tl.minimum(lo + CHUNK, S)
    total = tl.where(bins < E, total, 0)
    padded = tl.cdiv(total, BLOCK_M) * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    num_padded = tl.sum(padded, axis=0)
    if e == E:
        if c == 0:
            tl.store(num_padded_ptr, num_padded)
            tl.store(counts_ptr + bins, total, mask=bins < E)
            for p0 in range(num_padded, max_padded, TAIL_BLOCK):
                p = p0 + tl.arange(0, TAIL_BLOCK)
                tl.store(sorted_ptr + p, tl.zeros_like(p) + S, mask=p < max_padded)
                # Block b is unused when it starts at or past num_padded; num_padded is a multiple of BLOCK_M.
                b = p // BLOCK_M
                tl.store(block_expert_ptr + b, tl.full([TAIL_BLOCK], -1, tl.int32),
                         mask=(p < max_padded) & (p % BLOCK_M == 0))
    else:
        mine = bins == e
        count = tl.sum(tl.where(mine, total, 0), axis=0)
        if count > 0:
            start = tl.sum(tl.where(mine, pad_end - padded, 0), axis=0)
            size = tl.sum(tl.where(mine, padded, 0), axis=0)
            # Slots of expert e in slot order: an exclusive running count gives each its place.
            running = tl.sum(tl.where(mine, before, 0), axis=0)
            for s0 in range(lo, hi, SCAN):
                offs = s0 + tl.arange(0, SCAN)
                ids = tl.load(ids_ptr + offs, mask=offs < hi, other=-1)
                hit = (ids == e).to(tl.int32)
                rank = running + tl.cumsum(hit, axis=0) - hit
                tl.store(sorted_ptr + start + rank, offs, mask=hit > 0)
                running += tl.sum(hit, axis=0)
            if c == 0:
                rows = tl.arange(0, BLOCK_M)
                tl.store(sorted_ptr + start + count + rows, tl.zeros_like(rows) + S, mask=count + rows < size)
                for b0 in range(start // BLOCK_M, (start + size) // BLOCK_M, TAIL_BLOCK):
                    b = b0 + tl.arange(0, TAIL_BLOCK)
                    tl.store(block_expert_ptr + b, tl.zeros_like(b) + e, mask=b < (start + size) // BLOCK_M)


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
    fused, num_chunks = counting_plan(s)
    chunk_counts = ids
    if not fused:
        chunk_counts = empty(num_chunks, e_pad, dtype=torch.int32, device=dev)
        _count_kernel[(num_chunks,)](ids, chunk_counts, s, num_experts, CHUNK=CHUNK, SCAN=SCAN, E_PAD=e_pad,
                                     num_warps=4, **launch_args(ids))
    _scatter_kernel[(num_experts + 1, num_chunks)](
        ids, chunk_counts, sorted_ids, block_expert, num_padded, counts, s, num_experts, num_chunks, max_padded,
        FUSED=fused, SCAN=SCAN, CHUNK=CHUNK, E_PAD=e_pad, NC_PAD=triton.next_power_of_2(num_chunks), BLOCK_M=block_m,
        TAIL_BLOCK=TAIL_BLOCK, num_warps=4, **launch_args(ids),
    )
    return Alignment(sorted_ids, block_expert, num_padded, counts, block_m, s)
