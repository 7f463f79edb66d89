"""Prefill and mixed steps: the one padded attention call per layer equals the per-sequence loop.

The same staggered workload (chunked prefills beside decodes, preemption) is served twice, once
with the padded path and once with it switched off (every step over the loop); greedy tokens match
for each architecture, Mixtral with a sliding window shorter than the prompts included.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.models.layers import padded_attention
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

PROMPT_LENS = [2, 19, 7, 33, 1, 26, 11]
CASES = {"deepseek_v3": {}, "qwen3_moe": {}, "mixtral": {}, "mixtral-window": {"sliding_window": 6}}


def _serve(path: str, **kw) -> tuple[dict[str, list[int]], int]:
    config = EngineConfig(model=path, block_size=4, num_kv_blocks=20, max_num_seqs=4, max_num_batched_tokens=16,
                          max_model_len=64, **kw)
    engine = LLMEngine.from_config(config)
    vocab = engine.model_config.vocab_size
    got: dict[str, list[int]] = {}
    step = 0
    while step < 2 * len(PROMPT_LENS) or engine.has_unfinished():
        if step % 2 == 0 and step // 2 < len(PROMPT_LENS):
            i = step // 2
            prompt = torch.randint(0, vocab, (PROMPT_LENS[i],), generator=torch.Generator().manual_seed(i)).tolist()
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=10))
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
        assert step < 1000
    return got, engine.stats()["preemptions"]


@pytest.mark.parametrize("case", list(CASES))
def test_padded_equals_per_sequence_loop(case, hf_checkpoint, monkeypatch):
    path = str(hf_checkpoint(case.split("-")[0], seed=2, **CASES[case]))
    calls = []
    real = padded_attention.attend_padded
    monkeypatch.setattr(padded_attention, "attend_padded", lambda *a: calls.append(1) or real(*a))
    want, preemptions = _serve(path)
    assert calls, "prefill steps were meant to take the padded path"
    assert preemptions > 0, "the KV budget was meant to force preemption"
    monkeypatch.setattr(padded_attention, "MAX_SCORE_ELEMENTS", 0)
    calls.clear()
    got, _ = _serve(path)
    assert not calls
    assert got == want


@pytest.mark.parametrize("case", ["deepseek_v3", "qwen3_moe", "mixtral-window"])
def test_mixed_steps_split_equals_one_padded_call(case, hf_checkpoint, monkeypatch):
    """Mixed steps attend their decodes through the paged decode path and their prefill chunks padded
    among themselves (padded_attention.split_mixed): the same tokens as the whole step in one padded
    call, with every decode's query padded to the longest chunk."""
    path = str(hf_checkpoint(case.split("-")[0], seed=2, **CASES[case]))
    splits = []
    real = padded_attention.split_mixed

    def counting(batch, device):
        split = real(batch, device)
        if split is not None:
            decodes, chunks = split
            assert set(decodes.batch.query_lens) == {1} and 1 not in chunks.batch.query_lens
            assert decodes.rows.numel() + chunks.rows.numel() == batch.num_tokens
            splits.append(1)
        return split

    monkeypatch.setattr(padded_attention, "split_mixed", counting)
    got, _ = _serve(path)
    assert splits, "mixed steps were meant to be split"
    monkeypatch.setattr(padded_attention, "split_mixed", lambda batch, device: None)
    want, _ = _serve(path)
    assert got == want


@pytest.mark.parametrize("hq,hk,window", [(8, 2, None), (6, 1, 3), (4, 4, None)])
def test_query_heads_of_a_kv_head_side_by_side_equal_attention_head_by_head(hq, hk, window):
    """attend_padded lays the query heads of each KV head end to end (GQA, MLA's one latent head):
    every head equals its own softmax over its KV head's keys, in float64, padding and window masked."""
    from moeserve.models.batch import AttentionBatch

    q_lens, ctx_lens, d, dv = [3, 1, 5], [7, 4, 5], 8, 6
    batch = AttentionBatch(query_lens=q_lens, context_lens=ctx_lens, block_tables=torch.zeros(3, 2, dtype=torch.int32),
                           slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64), block_size=4)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(q_lens), hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(3, max(ctx_lens), hk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(3, max(ctx_lens), hk, dv, generator=gen, dtype=torch.float64)
    cpu = torch.device("cpu")
    lay = padded_attention.layout(batch, cpu)
    got = padded_attention.attend_padded(q, k, v, 0.3, lay, padded_attention.mask(batch, cpu, window, hq // hk))
    bias = padded_attention.mask(batch, cpu, window, hq // hk, torch.float64)  # the additive form: the same
    torch.testing.assert_close(padded_attention.attend_padded(q, k, v, 0.3, lay, bias), got, rtol=0, atol=0)
    row = 0
    for b, (n, ctx) in enumerate(zip(q_lens, ctx_lens)):
        for i in range(n):
            pos = ctx - n + i
            keys = [j for j in range(pos + 1) if window is None or j > pos - window]
            for h in range(hq):
                w = torch.softmax(k[b, keys, h // (hq // hk)] @ q[row, h] * 0.3, dim=0)
                torch.testing.assert_close(got[row, h], w @ v[b, keys, h // (hq // hk)])
            row += 1
    if hq != hk:
        with pytest.raises(ValueError, match=f"group={hq // hk}"):
            padded_attention.attend_padded(q, k, v, 0.3, lay, padded_attention.mask(batch, cpu, window))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral", "mixtral-window"])
def test_prefill_kernel_equals_padded_path_on_gpu(case, hf_checkpoint, monkeypatch):
    """On a GPU the GQA prefill chunks (fresh, after a cached prefix, beside decodes) go through the
    paged prefill kernel (kernels/prefill_attention.py): the same greedy tokens as the padded path,
    float32, eager steps."""
    from moeserve.kernels import ops

    path = str(hf_checkpoint(case.split("-")[0], seed=3, **CASES[case]))
    gpu = dict(device="cuda", dtype="float32", decode_graphs="off")
    assert ops.prefill_attention_in_place(torch.device("cuda"), 16, 16, 4, 2)
    got, preempted = _serve(path, **gpu)
    monkeypatch.setattr(ops, "DISABLED", ops.DISABLED | {"prefill_attention"})
    assert not ops.prefill_attention_in_place(torch.device("cuda"), 16, 16, 4, 2)
    want, _ = _serve(path, **gpu)
    assert preempted > 0 and got == want


@pytest.mark.parametrize("arch, layers", [("qwen3_moe", 3), ("deepseek_v3", 0)])
def test_prefill_kernel_warmed_up_when_the_cache_is_allocated(arch, layers, hf_checkpoint, monkeypatch):
    """Where the prefill kernel serves a GQA layer, allocating the KV cache runs it once per layer
    (Triton compiles on first use: at start-up, not in a request's step). MLA layers do not use it."""
    from moeserve.kernels import ops

    calls = []
    real = ops.paged_prefill_attention
    monkeypatch.setattr(ops, "prefill_attention_in_place", lambda *a: True)
    monkeypatch.setattr(ops, "paged_prefill_attention", lambda *a, **k: calls.append(a[4:6]) or real(*a, **k))
    LLMEngine.from_config(EngineConfig(model=str(hf_checkpoint(arch, seed=3)), num_kv_blocks=8, block_size=4))
    assert calls == [([1], [1])] * layers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hq,hk,d,dv", [(32, 4, 128, 128), (16, 16, 192, 128), (8, 8, 64, 64)])
def test_fresh_prompts_on_gpu_equal_the_masked_attention(hq, hk, d, dv):
    """A fresh-prompt step's attention on a GPU (causal, no mask tensor, key/value heads repeated:
    SDPA's fused kernels) equals the masked per-sequence attention: GQA, MLA's wider queries than
    values, plain multi-head."""
    from moeserve.models.layers.paged_attention import attend, attend_fresh, attention_mask

    g = torch.Generator(device="cuda").manual_seed(0)
    b, seq = 3, 37
    q = torch.randn(b * seq, hq, d, generator=g, device="cuda").bfloat16()
    k = torch.randn(b * seq, hk, d, generator=g, device="cuda").bfloat16()
    v = torch.randn(b * seq, hk, dv, generator=g, device="cuda").bfloat16()
    got = attend_fresh(q, k, v, d**-0.5, seq, None)
    mask = attention_mask(seq, seq, None, q.device)
    for i in range(b):
        rows = slice(i * seq, (i + 1) * seq)
        want = attend(q[rows].float(), k[rows].float(), v[rows].float(), d**-0.5, mask)
        torch.testing.assert_close(got[rows].float(), want, rtol=2e-2, atol=2e-2)


def test_planned_layout_puts_each_chunk_where_the_host_layout_does():
    """A fixed-shape chunk step's layout, built on the device from its plan (chunks padded to 8 rows, contexts
    read padded to 24 keys, a third sequence holding nothing): each real query sees the keys the host layout
    of the same chunks gives it, and every padding query sees some key (its output stays finite)."""
    from moeserve.kernels.prefill_attention import fixed_plan
    from moeserve.models.batch import AttentionBatch

    q_lens, ctx = [3, 8], [11, 20]
    tables = torch.zeros(3, 6, dtype=torch.int32)
    plan = torch.tensor(fixed_plan(8, q_lens, ctx, 3), dtype=torch.int32)
    fixed = AttentionBatch(query_lens=[8] * 3, context_lens=[8] * 3, block_tables=tables,
                           slot_mapping=torch.zeros(24, dtype=torch.int64), block_size=4, chunk_plan=plan, padded_len=24)
    host = AttentionBatch(query_lens=q_lens, context_lens=ctx, block_tables=tables[:2],
                          slot_mapping=torch.zeros(11, dtype=torch.int64), block_size=4)
    got = padded_attention.mask(fixed, torch.device("cpu"), None)[:, 0]  # [3, 8, 24]
    want = padded_attention.mask(host, torch.device("cpu"), None)[:, 0]  # [2, 8, 20]
    for i, n in enumerate(q_lens):
        assert torch.equal(got[i, :n, :20], want[i, :n]) and not got[i, :n, 20:].any()
    assert got.any(dim=-1).all()
    lay = padded_attention.layout(fixed, torch.device("cpu"))
    assert torch.equal(lay.out_index, torch.arange(24)) and lay.num_keys == 24
