"""Paged prefill attention: the Triton kernel against kernels/reference.py, and the reference against
plain per-query softmax attention over each sequence's own rows, in float64."""

import math

import pytest
import torch
from kernel_cases import DEVICE, ON_GPU, rel_err, row_errs

from moeserve.kernels import prefill_attention
from moeserve.kernels import reference as ref


def _problem(gen, query_lens, context_lens, hq, hk, d, page, dtype, spare_blocks=3):
    """Random new-token queries and caches, each sequence's blocks scattered through the cache."""
    per_seq = [math.ceil(n / page) for n in context_lens]
    num_blocks = sum(per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen, device=DEVICE).int()
    tables = torch.zeros(len(context_lens), max(per_seq), dtype=torch.int32, device=DEVICE)
    at = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[at:at + n]
        at += n
    q = torch.randn(sum(query_lens), hq, d, generator=gen, device=DEVICE).to(dtype)
    k_cache = torch.randn(num_blocks, page, hk, d, generator=gen, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, page, hk, d, generator=gen, device=DEVICE).to(dtype)
    return q, k_cache, v_cache, tables


def _naive(q, k_cache, v_cache, tables, query_lens, context_lens, scale, window=None):
    """Query by query, head by head, in float64: the plain definition."""
    page, hk, hq = k_cache.shape[1], k_cache.shape[2], q.shape[1]
    out = torch.zeros(q.shape[0], hq, v_cache.shape[-1], dtype=torch.float64)
    keys_all = k_cache.reshape(-1, hk, k_cache.shape[-1]).double().cpu()
    values_all = v_cache.reshape(-1, hk, v_cache.shape[-1]).double().cpu()
    row = 0
    for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        for j in range(q_len):
            p = ctx - q_len + j
            lo = max(0, p - window + 1) if window else 0
            slots = [int(tables[i, x // page]) * page + x % page for x in range(lo, p + 1)]
            for h in range(hq):
                kh = h // (hq // hk)
                w = torch.softmax(keys_all[slots, kh] @ q[row, h].double().cpu() * scale, dim=0)
                out[row, h] = w @ values_all[slots, kh]
            row += 1
    return out


CASES = [  # (query lens, context lens, Hq, Hk, D, page, window)
    ([5], [5], 4, 4, 16, 16, None),  # one fresh prompt, shorter than a tile
    ([17, 3, 30], [17, 3, 30], 8, 2, 32, 16, None),  # fresh prompts, GQA of 4
    ([10, 1, 20], [40, 33, 20], 4, 2, 16, 8, None),  # chunks after a cached prefix, a decode-like row
    ([70], [83], 2, 1, 16, 16, None),  # two query tiles; keys past one key tile
    ([12, 40], [60, 40], 4, 4, 32, 16, 7),  # sliding window shorter than the chunks and the prefix
    ([9], [100], 2, 2, 16, 16, 70),  # window starting inside the cached prefix, off a key tile
]


@pytest.mark.parametrize("query_lens,context_lens,hq,hk,d,page,window", CASES)
def test_kernel_matches_reference(query_lens, context_lens, hq, hk, d, page, window, gen):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, kc, vc, tables = _problem(gen, query_lens, context_lens, hq, hk, d, page, dtype)
    scale = d ** -0.5
    got = prefill_attention.paged_prefill_attention(q, kc, vc, tables, query_lens, context_lens, scale, window)
    want = ref.paged_prefill_attention(q, kc, vc, tables, query_lens, context_lens, scale, window)
    assert got.shape == (sum(query_lens), hq, d) and got.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(got, want) < tol
    assert (row_errs(got.flatten(0, 1), want.flatten(0, 1)) < 3 * tol).all()


@pytest.mark.parametrize("case", [CASES[2], CASES[4]])
def test_reference_matches_the_definition(case, gen):
    query_lens, context_lens, hq, hk, d, page, window = case
    q, kc, vc, tables = _problem(gen, query_lens, context_lens, hq, hk, d, page, torch.float32)
    scale = d ** -0.5
    got = ref.paged_prefill_attention(q, kc, vc, tables, query_lens, context_lens, scale, window)
    want = _naive(q, kc, vc, tables, query_lens, context_lens, scale, window)
    assert rel_err(got.double().cpu(), want) < 1e-5


def test_bad_shapes_are_refused(gen):
    q, kc, vc, tables = _problem(gen, [4], [4], 4, 4, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="query_len=5"):
        prefill_attention.make_plan([5], [4])
    with pytest.raises(ValueError, match="query_lens sum"):
        prefill_attention.paged_prefill_attention(q, kc, vc, tables, [3], [4], 0.25)
    assert not prefill_attention.supports(24, 24, 4, 4) and not prefill_attention.supports(16, 16, 6, 4)
    assert prefill_attention.supports(128, 128, 32, 4)


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4]])
def test_fixed_plan_matches_the_plain_launch(case, gen, monkeypatch):
    """A fixed plan (a CUDA graph's step): each chunk padded to the same rows, one padding sequence
    past them; the real rows are those of the plain launch, bit for bit, and the padding rows are not
    written (they keep the poison the output buffer held)."""
    query_lens, context_lens, hq, hk, d, page, window = case
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, kc, vc, tables = _problem(gen, query_lens, context_lens, hq, hk, d, page, dtype)
    scale = d ** -0.5
    want = prefill_attention.paged_prefill_attention(q, kc, vc, tables, query_lens, context_lens, scale, window)
    padded, seqs = max(query_lens) + 3, len(query_lens) + 1
    rows = torch.tensor([i * padded + j for i, n in enumerate(query_lens) for j in range(n)], device=DEVICE)
    q_pad = torch.zeros(seqs * padded, hq, d, dtype=dtype, device=DEVICE)
    q_pad[rows] = q
    tables_pad = torch.cat([tables, torch.zeros_like(tables[:1])])
    plan = torch.tensor(prefill_attention.fixed_plan(padded, query_lens, context_lens, seqs), dtype=torch.int32,
                        device=DEVICE)
    assert prefill_attention.fixed_tiles([padded] * seqs) == seqs * math.ceil(padded / prefill_attention.BLOCK_M)
    real_empty = prefill_attention.empty
    monkeypatch.setattr(prefill_attention, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    got = prefill_attention.paged_prefill_attention(q_pad, kc, vc, tables_pad, [padded] * seqs, [padded] * seqs,
                                                    scale, window, plan=plan)
    assert torch.equal(got[rows], want)
    unwritten = torch.ones(seqs * padded, dtype=torch.bool, device=DEVICE)
    unwritten[rows] = False
    assert got[unwritten].isnan().all()
    with pytest.raises(ValueError, match="query_len=4"):
        prefill_attention.fixed_plan(3, [4], [9], 1)
    with pytest.raises(ValueError, match="2 chunks"):
        prefill_attention.fixed_plan(8, [4, 4], [9, 9], 1)


def test_an_eager_steps_layers_share_one_plan():
    """The plan of the lengths just seen is reused (an eager step's every layer attends the same chunks);
    other lengths get their own."""
    from moeserve.kernels.prefill_attention import _device_plan, make_plan

    cpu = torch.device("cpu")
    first, tiles = _device_plan([3, 70], [10, 70], cpu)
    again, _ = _device_plan([3, 70], [10, 70], cpu)
    host, want_tiles = make_plan([3, 70], [10, 70])
    assert again is first and first.tolist() == host and tiles == want_tiles
    other, _ = _device_plan([3, 70], [11, 70], cpu)
    assert other is not first and other.tolist() == make_plan([3, 70], [11, 70])[0]
