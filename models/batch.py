"""The flat batch of one engine step, as the model sees it.

The engine (router/) owns KV memory and scheduling; the model only needs to know, for the tokens of
this step, where each sequence's cached keys/values live and where to write the new ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionBatch:
    """Per-sequence layout of the step's flat token batch (sequences are contiguous, in order)."""

    query_lens: list[int]  # new tokens of each sequence in this step (a prefill chunk, or 1 when decoding)
    context_lens: list[int]  # tokens in each sequence's context after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32 block ids; entries past a sequence's blocks are never read
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset where each new token's KV goes
    block_size: int
    # Fixed-shape decode (the CUDA-graph path): every sequence's context is read padded to `padded_len`
    # slots and masked by the device tensor `context_lens_tensor` [B] instead of the host lists, so one
    # captured step serves any lengths up to padded_len. The lists then only give the batch's shape.
    padded_len: int | None = None
    context_lens_tensor: torch.Tensor | None = None
    # Fixed-shape prompts (the prompt-graph path): sequences whose every token is new (nothing cached),
    # each padded at its end to the same length query_lens[0], back to back. Attention is causal over
    # each sequence's own keys, read back from the slots just written, so the step's shape is (number
    # of sequences, length) alone; padding rows come after every real one, so no real query sees them.
    fresh: bool = False
    # Fixed-shape chunks over cached prefixes (the chunk-graph path): sequence i's chunk at rows
    # i * query_lens[0] onwards, padded at its end; the real lengths are in `chunk_plan` on the device
    # (kernels/prefill_attention.fixed_plan: per sequence [first row, chunk length, context length],
    # then the tiles), rewritten before each replay, so one captured step serves any chunk of up to
    # query_lens[0] tokens after any cached prefix. The host lists then only give the shape.
    chunk_plan: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @classmethod
    def contiguous(cls, num_cached: int, num_new: int, block_size: int, device: torch.device | str = "cpu") -> "AttentionBatch":
        """One sequence whose blocks are 0, 1, 2, ...: the simplest layout, for tests and offline runs."""
        total = num_cached + num_new
        blocks = (total + block_size - 1) // block_size
        return cls(
            query_lens=[num_new],
            context_lens=[total],
            block_tables=torch.arange(blocks, dtype=torch.int32, device=device).unsqueeze(0),
            slot_mapping=torch.arange(num_cached, total, dtype=torch.int64, device=device),
            block_size=block_size,
        )
