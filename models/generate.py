"""Greedy generation for one sequence through the paged-attention API (offline runs, demos, tests).

The serving engine (router/) does the real scheduling; this is the smallest honest loop over
`forward` / `compute_logits`: a chunked prefill, then one token per step, blocks 0, 1, 2, ...
"""

from __future__ import annotations

import torch

from .batch import AttentionBatch
from .causal_lm import MoECausalLM


@torch.inference_mode()
def greedy_generate(
    model: MoECausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    block_size: int = 16,
    prefill_chunk: int | None = None,
    eos_token_ids: list[int] | tuple[int, ...] = (),
) -> list[int]:
    """The argmax continuation of prompt_ids (new tokens only), stopping after an eos id."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    device = model.model.embed_tokens.weight.device
    total = len(prompt_ids) + max_new_tokens
    model.allocate_kv_cache((total + block_size - 1) // block_size, block_size, device=device)
    chunk = prefill_chunk or len(prompt_ids)
    tokens = list(prompt_ids)
    out: list[int] = []
    done = 0
    while len(out) < max_new_tokens:
        step = tokens[done : done + chunk] if done < len(prompt_ids) else tokens[done:]
        batch = AttentionBatch.contiguous(done, len(step), block_size, device=device)
        ids = torch.tensor(step, dtype=torch.long, device=device)
        positions = torch.arange(done, done + len(step), dtype=torch.long, device=device)
        hidden = model(ids, positions, batch)
        done += len(step)
        if done < len(prompt_ids):
            continue  # mid-prompt chunk: nothing to sample yet
        nxt = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out.append(nxt)
        tokens.append(nxt)
        if nxt in eos_token_ids:
            break
    return out
