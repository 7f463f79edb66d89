"""Paged KV bookkeeping: fixed-size blocks, a free list, and each sequence's block table.

Pure bookkeeping over block ids; the KV tensors themselves live in the model (allocate_kv_cache).
A sequence holds enough blocks for every token it has (prompt, completion so far): the token fed
to the model at a step writes its KV into the slot at its position.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def num_blocks_for_budget(budget_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """How many whole blocks fit in a byte budget."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    return max(0, budget_bytes // (bytes_per_token * block_size))


class BlockManager:
    """Hands out KV blocks to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_missing(self, seq: Sequence, extra: int = 0) -> int:
        """Blocks a sequence still needs to cover all its tokens and `extra` more (0 for one fully covered)."""
        return max(0, blocks_for(len(seq) + extra, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether the blocks for all of a waiting sequence's tokens are free."""
        return blocks_for(len(seq), self.block_size) <= len(self.free_block_ids)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens (prompt, and completion when recomputing)."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id}: already holds blocks {seq.block_table}")
        need = blocks_for(len(seq), self.block_size)
        if need > len(self.free_block_ids):
            raise RuntimeError(f"{seq.request_id}: needs {need} blocks, {len(self.free_block_ids)} free")
        seq.block_table = [self.free_block_ids.popleft() for _ in range(need)]

    def can_append(self, seq: Sequence, extra: int = 0) -> bool:
        """Whether a running sequence's newest token (and `extra` tokens past it) has or can get a slot."""
        return self.blocks_missing(seq, extra) <= len(self.free_block_ids)

    def append(self, seq: Sequence, extra: int = 0) -> None:
        """Grow a running sequence's block table to cover its newest token, and `extra` tokens past it
        (a decode launched before the token it reads is known, LLMEngine's look-ahead)."""
        missing = self.blocks_missing(seq, extra)
        if missing > len(self.free_block_ids):
            raise RuntimeError(f"{seq.request_id}: needs {missing} more blocks, {len(self.free_block_ids)} free")
        for _ in range(missing):
            seq.block_table.append(self.free_block_ids.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of a sequence's blocks; its cached tokens are forgotten."""
        self.free_block_ids.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
