"""Paged KV bookkeeping: fixed-size blocks, a free list, each sequence's block table, and the prefix cache.

Pure bookkeeping over block ids; the KV tensors themselves live in the model (allocate_kv_cache).
A sequence holds enough blocks for every token it has (prompt, completion so far): the token fed
to the model at a step writes its KV into the slot at its position.

Prefix caching (on unless turned off). Once a block is full and its KV computed, it is registered
under its tokens and the chain of blocks before it; a sequence admitted later whose tokens begin
with the same whole blocks takes those blocks (shared, counted by reference) and starts computing
after them. The key is the block's tokens themselves with the serial number of the block before
(not a hash of them), so two different prefixes can never share a block. A sequence never writes a
shared block: it matches at most the whole blocks before its last token, which it must compute to
sample. A block no sequence holds any more stays cached and counts as free: a new block is taken
from the blocks holding nothing first, then from the cached ones, least recently released first
(a sequence's later blocks before its earlier ones). A sequence preempted for recomputation finds
its own blocks again unless they were taken meanwhile.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .sequence import Sequence

_Key = tuple[int, tuple[int, ...]]  # (serial number of the previous block's key, 0 for none; this block's tokens)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def num_blocks_for_budget(budget_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """How many whole blocks fit in a byte budget."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    return max(0, budget_bytes // (bytes_per_token * block_size))


class BlockManager:
    """Hands out KV blocks to sequences, takes them back, and keeps full blocks for reuse (prefix caching)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # free and holding nothing reusable
        self._refs = [0] * num_blocks  # sequences holding each block
        self._cached: dict[_Key, tuple[int, int]] = {}  # key -> (its serial number, the block holding it)
        self._key_of: dict[int, _Key] = {}  # block -> its key, while cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first
        self._serial = 0
        self.prefix_queried_tokens = 0  # tokens of admitted sequences looked up in the cache
        self.prefix_hit_tokens = 0  # of those, tokens whose KV came from the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def free_blocks(self) -> list[int]:
        """Every block no sequence holds: those holding nothing, then the cached ones in the order they would be taken."""
        return [*self.free_block_ids, *self._evictable]

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held by a sequence or not."""
        return len(self._key_of)

    @property
    def num_idle_cached_blocks(self) -> int:
        """Cached blocks no sequence holds: counted as free, kept until a new block is needed."""
        return len(self._evictable)

    def blocks_missing(self, seq: Sequence, extra: int = 0) -> int:
        """Blocks a sequence still needs to cover all its tokens and `extra` more (0 for one fully covered)."""
        return max(0, blocks_for(len(seq) + extra, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether the blocks for all of a waiting sequence's tokens are free or cached."""
        return self._fits(seq, self._match(seq))

    def _fits(self, seq: Sequence, hits: list[tuple[int, int]]) -> bool:
        idle_hits = sum(1 for _, block in hits if self._refs[block] == 0)  # cached and counted as free
        return blocks_for(len(seq), self.block_size) - len(hits) <= self.num_free_blocks - idle_hits

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens (prompt, and completion when recomputing): the
        cached blocks its tokens begin with, whose tokens count as computed, then free ones."""
        if not self.try_allocate(seq):
            raise RuntimeError(f"{seq.request_id}: needs {blocks_for(len(seq), self.block_size)} blocks, "
                               f"{self.num_free_blocks} free")

    def try_allocate(self, seq: Sequence) -> bool:
        """allocate() when the blocks are there (the prompt matched against the cache once); else False."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id}: already holds blocks {seq.block_table}")
        hits = self._match(seq)
        if not self._fits(seq, hits):
            return False
        for _, block in hits:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table = [block for _, block in hits]
        seq.block_table += [self._take() for _ in range(blocks_for(len(seq), self.block_size) - len(hits))]
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_blocks = len(hits)
        seq.prefix_serial = hits[-1][0] if hits else 0
        if self.prefix_caching:
            self.prefix_queried_tokens += len(seq)
            self.prefix_hit_tokens += seq.num_computed_tokens
        return True

    def can_append(self, seq: Sequence, extra: int = 0) -> bool:
        """Whether a running sequence's newest token (and `extra` tokens past it) has or can get a slot."""
        return self.blocks_missing(seq, extra) <= self.num_free_blocks

    def append(self, seq: Sequence, extra: int = 0) -> None:
        """Grow a running sequence's block table to cover its newest token, and `extra` tokens past it
        (a decode launched before the token it reads is known, LLMEngine's look-ahead)."""
        missing = self.blocks_missing(seq, extra)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"{seq.request_id}: needs {missing} more blocks, {self.num_free_blocks} free")
        for _ in range(missing):
            seq.block_table.append(self._take())

    def register(self, seq: Sequence) -> None:
        """Put a sequence's blocks that are now full and computed into the prefix cache (after a step)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, len(seq.token_ids), len(seq.block_table) * bs) // bs
        for i in range(seq.num_cached_blocks, full):
            key = (seq.prefix_serial, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            known = self._cached.get(key)
            if known is None:  # else another block holds the same tokens: this one stays private
                self._serial += 1
                known = (self._serial, seq.block_table[i])
                self._cached[key] = known
                self._key_of[known[1]] = key
            seq.prefix_serial = known[0]
            seq.num_cached_blocks = i + 1

    def free(self, seq: Sequence) -> None:
        """Release all of a sequence's blocks: cached ones stay reusable until taken, the rest are free at once."""
        for block in reversed(seq.block_table):  # the sequence's later blocks are taken back before its earlier
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self.free_block_ids.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.prefix_serial = 0

    def _match(self, seq: Sequence) -> list[tuple[int, int]]:
        """(serial, block) of the cached blocks a sequence's tokens begin with, short of its last token."""
        if not self.prefix_caching or not self._cached or seq.prompt_logprobs is not None:
            return []  # (prompt logprobs need every prompt position computed)
        bs, tokens, hits, serial = self.block_size, seq.token_ids, [], 0
        for i in range((len(tokens) - 1) // bs):
            known = self._cached.get((serial, tuple(tokens[i * bs:(i + 1) * bs])))
            if known is None:
                break
            hits.append(known)
            serial = known[0]
        return hits

    def _take(self) -> int:
        """A free block for one sequence: one holding nothing if any, else the least recently released cached one."""
        if self.free_block_ids:
            block = self.free_block_ids.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(block)]
        self._refs[block] = 1
        return block
