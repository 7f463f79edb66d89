"""A decode-only step (one batched attention call) equals each sequence's last position computed alone;
in bf16 its scores stay in float32 (as SDPA and flash kernels keep them)."""

from __future__ import annotations

import pytest
import torch

from moeserve.models.batch import AttentionBatch
from moeserve.models.layers.decode_attention import attend_decode
from moeserve.models.loader import load_model

BS = 4


def _last_logits_alone(model, tokens: list[int]) -> torch.Tensor:
    """The logits after `tokens`, from one prefill in a fresh cache (the per-sequence path)."""
    model.allocate_kv_cache(num_blocks=16, block_size=BS)
    n = len(tokens)
    hidden = model(torch.tensor(tokens), torch.arange(n), AttentionBatch.contiguous(0, n, BS))
    return model.compute_logits(hidden[-1:])[0]


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("lengths", [[5, 9, 14], [1, 2]])  # MLA: absorbed, then expanded (short contexts)
def test_decode_only_batch_matches_each_sequence_alone(arch, lengths, hf_checkpoint):
    model = load_model(hf_checkpoint(arch))
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    want = [_last_logits_alone(model, s) for s in seqs]

    # one shared cache, blocks scattered: prefill all but the last token, then decode the last together
    free = [9, 2, 14, 5, 0, 11, 7, 3, 12, 1]
    tables = [[free.pop() for _ in range((n + BS - 1) // BS)] for n in lengths]
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)

    def slots(i: int, start: int, stop: int) -> list[int]:
        return [tables[i][p // BS] * BS + p % BS for p in range(start, stop)]

    model.allocate_kv_cache(num_blocks=16, block_size=BS)
    cached = [n - 1 for n in lengths]
    if any(cached):
        rows = [i for i, c in enumerate(cached) if c]
        prefill = AttentionBatch(
            query_lens=[cached[i] for i in rows], context_lens=[cached[i] for i in rows],
            block_tables=block_tables[rows], slot_mapping=torch.tensor([x for i in rows for x in slots(i, 0, cached[i])]),
            block_size=BS)
        model(torch.tensor([t for i in rows for t in seqs[i][:-1]]),
              torch.tensor([p for i in rows for p in range(cached[i])]), prefill)
    decode = AttentionBatch(query_lens=[1] * len(seqs), context_lens=list(lengths), block_tables=block_tables,
                            slot_mapping=torch.tensor([slots(i, n - 1, n)[0] for i, n in enumerate(lengths)]),
                            block_size=BS)
    got = model.compute_logits(model(torch.tensor([s[-1] for s in seqs]), torch.tensor(cached), decode))
    for i in range(len(seqs)):
        torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 4, 128), (16, 1, 576)])  # GQA; MLA's one latent head
def test_bf16_decode_attention_is_accurate_with_large_logits(heads, kv_heads, dim):
    g = torch.Generator().manual_seed(0)
    b, n, mag = 3, 200, 8.0  # logits in the hundreds: a bf16 score matmul loses several % here
    q = (torch.randn(b, heads, dim, generator=g) * mag).bfloat16()
    k = (torch.randn(b, kv_heads, n, dim, generator=g) * mag).bfloat16()
    v = torch.randn(b, kv_heads, n, dim, generator=g).bfloat16()
    lens = torch.tensor([n, 17, 120])
    mask = (torch.arange(n)[None, :] < lens[:, None])[:, None, None, :]
    out = attend_decode(q, k, v, dim ** -0.5, mask).double()
    qd = q.double().view(b, kv_heads, heads // kv_heads, dim)
    scores = (qd @ k.double().transpose(-1, -2)) * dim ** -0.5
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v.double()
    ref = ref.reshape(b, heads, dim)
    assert float((out - ref).norm() / ref.norm()) < 5e-3
