"""A mixed AttentionBatch (a prefill chunk and a decode, scattered blocks) equals each sequence run alone."""

from __future__ import annotations

import pytest
import torch

from moeserve.models.batch import AttentionBatch
from moeserve.models.loader import load_model

BS = 4


def _run(model, ids, positions, batch):
    return model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), batch))


def _alone(model, tokens: list[int], split: int) -> torch.Tensor:
    """Prefill tokens[:split], then tokens[split:] as one chunk, in a fresh contiguous cache."""
    model.allocate_kv_cache(num_blocks=8, block_size=BS)
    _run(model, tokens[:split], list(range(split)), AttentionBatch.contiguous(0, split, BS))
    rest = list(range(split, len(tokens)))
    return _run(model, tokens[split:], rest, AttentionBatch.contiguous(split, len(rest), BS))


def _slots(blocks: list[int], start: int, stop: int) -> list[int]:
    return [blocks[p // BS] * BS + p % BS for p in range(start, stop)]


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_mixed_prefill_chunk_and_decode_match_each_alone(arch, hf_checkpoint):
    model = load_model(hf_checkpoint(arch))
    g = torch.Generator().manual_seed(7)
    a = torch.randint(0, 256, (10,), generator=g).tolist()  # cached 6, then a chunk of 4
    b = torch.randint(0, 256, (7,), generator=g).tolist()  # cached 6, then one decode token
    want_a, want_b = _alone(model, a, 6), _alone(model, b, 6)

    # One shared cache; blocks scattered and interleaved between the two sequences.
    blocks_a, blocks_b = [5, 2, 7], [3, 0]
    tables = torch.tensor([blocks_a, blocks_b + [-1]], dtype=torch.int32)
    model.allocate_kv_cache(num_blocks=8, block_size=BS)
    both_prefill = AttentionBatch(
        query_lens=[6, 6], context_lens=[6, 6], block_tables=tables,
        slot_mapping=torch.tensor(_slots(blocks_a, 0, 6) + _slots(blocks_b, 0, 6)), block_size=BS,
    )
    _run(model, a[:6] + b[:6], list(range(6)) * 2, both_prefill)
    mixed = AttentionBatch(
        query_lens=[4, 1], context_lens=[10, 7], block_tables=tables,
        slot_mapping=torch.tensor(_slots(blocks_a, 6, 10) + _slots(blocks_b, 6, 7)), block_size=BS,
    )
    got = _run(model, a[6:] + b[6:], [6, 7, 8, 9, 6], mixed)
    torch.testing.assert_close(got[:4], want_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[4:], want_b, atol=1e-5, rtol=0)


def test_cache_bytes_per_token_counts_latent_for_mla(hf_checkpoint):
    mla = load_model(hf_checkpoint("deepseek_v3"))
    c = mla.config
    assert mla.kv_cache_bytes_per_token() == c.num_hidden_layers * (c.mla.kv_lora_rank + c.mla.qk_rope_head_dim) * 4
    assert mla.kv_cache_bytes_per_token(torch.bfloat16) == mla.kv_cache_bytes_per_token() // 2
    gqa = load_model(hf_checkpoint("mixtral"))
    c = gqa.config
    assert gqa.kv_cache_bytes_per_token() == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    gqa.allocate_kv_cache(num_blocks=3, block_size=BS)
    cache = gqa.model.layers[0].self_attn.k_cache
    assert cache.shape == (3, BS, c.num_key_value_heads, c.head_dim)


def test_batch_with_other_block_size_is_refused(hf_checkpoint):
    model = load_model(hf_checkpoint("mixtral"))
    model.allocate_kv_cache(num_blocks=4, block_size=BS)
    with pytest.raises(ValueError, match="block_size"):
        _run(model, [1, 2], [0, 1], AttentionBatch.contiguous(0, 2, 8))
