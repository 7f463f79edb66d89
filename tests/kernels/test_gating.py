"""Triton gating kernels against kernels/reference.py."""

import pytest
import torch
from kernel_cases import DEVICE, ON_GPU, gpu

from moeserve.kernels import gating
from moeserve.kernels import reference as ref


def _check_topk(w, ids, ref_w, ref_ids, scores):
    """Same chosen experts (as sets; ties may be ordered differently) with the same weights."""
    assert ids.shape == ref_ids.shape and w.shape == ref_w.shape
    assert torch.isfinite(w).all()
    got_ids, p = ids.sort(dim=1)
    want_ids, q = ref_ids.sort(dim=1)
    same = (got_ids == want_ids).all(dim=1)
    # Rows that differ must differ only by tied scores: equal chosen score multisets.
    for r in (~same).nonzero().flatten().tolist():
        torch.testing.assert_close(scores[r, ids[r]].sort().values, scores[r, ref_ids[r]].sort().values)
    torch.testing.assert_close(w.gather(1, p)[same], ref_w.gather(1, q)[same], rtol=1e-5, atol=1e-6)
    assert (ids >= 0).all() and (ids < scores.shape[1]).all()
    assert all(len(set(row)) == ids.shape[1] for row in ids.tolist())


SOFTMAX_CASES = [  # (T, E, k)
    (1, 8, 2),  # one token
    (19, 8, 8),  # top-k == number of experts
    (37, 60, 6),  # E not a power of two, T not a multiple of the token block
    (5, 128, 8),
    (83, 60, 6),  # past ONE_TOKEN_BLOCKS_MAX: several tokens per program
]


@pytest.mark.parametrize("t,e,k", SOFTMAX_CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk(t, e, k, renormalize, gen):
    logits = torch.randn(t, e, generator=gen, device=DEVICE)
    w, ids = gating.softmax_topk(logits, k, renormalize)
    ref_w, ref_ids = ref.softmax_topk(logits, k, renormalize)
    assert (ids == ref_ids).all()  # both sorted by descending score
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_softmax_topk_bf16_logits_with_ties(gen):
    logits = torch.randn(33, 64, generator=gen, device=DEVICE).bfloat16()
    w, ids = gating.softmax_topk(logits, 6, True)
    ref_w, ref_ids = ref.softmax_topk(logits, 6, True)
    _check_topk(w, ids, ref_w, ref_ids, torch.softmax(logits.float(), -1))


GROUPED_CASES = [  # (T, E, k, n_group, topk_group)
    (1, 16, 4, 4, 2),
    (37, 32, 6, 8, 3),
    (9, 16, 8, 4, 4),  # every group kept
    (20, 64, 8, 8, 4),
    (70, 32, 6, 8, 3),  # several tokens per program
]


@pytest.mark.parametrize("t,e,k,n_group,topk_group", GROUPED_CASES)
@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_grouped_topk(t, e, k, n_group, topk_group, variant, gen):
    logits = torch.randn(t, e, generator=gen, device=DEVICE)
    if variant == "v3":  # sigmoid + e_score_correction_bias + renormalise + routed_scaling_factor
        kw = dict(scoring="sigmoid", renormalize=True, routed_scaling_factor=2.5,
                  correction_bias=torch.randn(e, generator=gen, device=DEVICE) * 0.5)
    else:  # DeepSeek-V2 group_limited_greedy: softmax, groups ranked by their best expert
        kw = dict(scoring="softmax", renormalize=False, routed_scaling_factor=16.0)
    w, ids = gating.grouped_topk(logits, k, n_group=n_group, topk_group=topk_group, **kw)
    ref_w, ref_ids = ref.grouped_topk(logits, k, n_group=n_group, topk_group=topk_group, **kw)
    scores = torch.sigmoid(logits) if variant == "v3" else torch.softmax(logits, -1)
    if kw.get("correction_bias") is not None:
        scores = scores + kw["correction_bias"]
    _check_topk(w, ids, ref_w, ref_ids, scores)
    groups = ids // (e // n_group)
    assert all(len(set(row)) <= topk_group for row in groups.tolist())


def test_grouped_topk_rejects_bad_groups():
    logits = torch.zeros(2, 12, device=DEVICE)
    with pytest.raises(ValueError, match="n_group"):
        gating.grouped_topk(logits, 2, n_group=5, topk_group=1, renormalize=True)
    with pytest.raises(ValueError, match="top-k"):
        gating.grouped_topk(logits, 7, n_group=4, topk_group=2, renormalize=True)


@gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_gating_real_shapes(t, gen):
    """Qwen3-30B-A3B softmax gate (128 experts, top-8) and DeepSeek-V3's (256, 8 groups, top-8)."""
    logits = torch.randn(t, 128, generator=gen, device=DEVICE)
    w, ids = gating.softmax_topk(logits, 8, True)
    ref_w, ref_ids = ref.softmax_topk(logits, 8, True)
    _check_topk(w, ids, ref_w, ref_ids, torch.softmax(logits, -1))
    logits = torch.randn(t, 256, generator=gen, device=DEVICE)
    bias = torch.randn(256, generator=gen, device=DEVICE) * 0.1
    kw = dict(n_group=8, topk_group=4, renormalize=True, correction_bias=bias, routed_scaling_factor=2.5)
    w, ids = gating.grouped_topk(logits, 8, **kw)
    ref_w, ref_ids = ref.grouped_topk(logits, 8, **kw)
    _check_topk(w, ids, ref_w, ref_ids, torch.sigmoid(logits) + bias)


@pytest.mark.parametrize("t,e,h", [(1, 128, 256), (5, 60, 200), (16, 8, 64), (3, 256, 130)])
def test_router_logits_match_float32_reference(t, e, h, gen):
    """The decode-size router GEMV: bf16 activations times the float32 router weight, in float32."""
    x = torch.randn(t, h, generator=gen, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(e, h, generator=gen, device=DEVICE)
    torch.testing.assert_close(gating.router_logits(x, w), ref.router_logits(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("t,e,h", [(17, 128, 256), (70, 60, 200), (129, 8, 64), (33, 256, 130), (1, 64, 2048)])
def test_router_logits_gemm_match_float32_reference(t, e, h, gen):
    """The prompt-size router GEMM (three bf16 parts of each float32 weight on tensor cores) gives the
    float32 GEMM's logits: token counts past the row block, E and H not multiples of the blocks, E
    under the smallest block. Poisoned output: every logit must be written."""
    x = torch.randn(t, h, generator=gen, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(e, h, generator=gen, device=DEVICE) * 0.05
    got = gating.router_logits_gemm(x, w)
    torch.testing.assert_close(got, ref.router_logits(x, w), rtol=1e-5, atol=1e-4)


def test_router_logits_gemm_keep_every_bit_of_the_weight(gen):
    """A weight whose low bits a bf16 rounding would lose: the three parts carry them. One-hot
    activations pick single weights, so each logit must be the float32 weight itself, exactly."""
    e, h = 16, 64
    w = (1.0 + torch.arange(e * h, device=DEVICE, dtype=torch.float32).view(e, h) * 2.0**-20) * 0.37
    x = torch.eye(h, device=DEVICE, dtype=torch.bfloat16)[:20]
    assert torch.equal(gating.router_logits_gemm(x, w), w[:, :20].t().contiguous())


def test_router_logits_gemm_of_a_row_do_not_depend_on_the_batch(gen):
    """A prompt graph pads its tokens to a bucket: a row's logits must be the same bits in both."""
    x = torch.randn(200, 192, generator=gen, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(64, 192, generator=gen, device=DEVICE)
    batch = gating.router_logits_gemm(x, w)
    for t in (17, 64, 100):
        assert torch.equal(gating.router_logits_gemm(x[:t], w), batch[:t])


def test_router_logits_gemm_refuse_other_dtypes(gen):
    w = torch.randn(8, 64, generator=gen, device=DEVICE)
    with pytest.raises(ValueError, match="bf16 activations and a float32 weight"):
        gating.router_logits_gemm(torch.zeros(20, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="columns"):
        gating.router_logits_gemm(torch.zeros(20, 32, device=DEVICE, dtype=torch.bfloat16), w)


def test_router_logits_refuse_what_they_do_not_take(gen):
    from moeserve.kernels.ops import ROUTER_GEMV_MAX_TOKENS

    w = torch.randn(8, 64, generator=gen, device=DEVICE)
    with pytest.raises(ValueError, match="tokens"):
        gating.router_logits(torch.zeros(ROUTER_GEMV_MAX_TOKENS + 1, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="columns"):
        gating.router_logits(torch.zeros(2, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="16384 features"):  # a program holds whole weight rows
        gating.router_logits(torch.zeros(1, 16385, device=DEVICE), torch.zeros(8, 16385, device=DEVICE))


def test_router_logits_of_a_row_do_not_depend_on_the_batch(gen):
    """A token's logits are the same bits whether it comes alone or with 15 others (a CUDA graph padded
    to a batch bucket computes what the eager step would)."""
    x = torch.randn(16, 192, generator=gen, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(128, 192, generator=gen, device=DEVICE)
    batch = gating.router_logits(x, w)
    for t in (1, 3, 5):
        assert torch.equal(gating.router_logits(x[:t], w), batch[:t])


@pytest.mark.parametrize("t,e,h", [(1, 128, 256), (5, 60, 200), (16, 8, 64), (3, 256, 130)])
def test_add_norm_router_logits_are_the_add_the_norm_and_the_router(t, e, h, gen, monkeypatch):
    """The decoder's add and post-attention RMSNorm folded into the router's launch: the sums and the normed
    rows are norm_rope.add_rms_norm's bits (the reference's here), written once whatever the number of expert
    blocks, and the logits the router's over those rows; a row's results do not depend on the batch.
    ops.add_rms_norm_router_logits takes it up to ADD_NORM_ROUTER_MAX_TOKENS tokens (0: never)."""
    from moeserve.kernels import ops

    x = torch.randn(t, h, generator=gen, device=DEVICE).to(torch.bfloat16)
    residual = (torch.randn(t, h, generator=gen, device=DEVICE) * 4).to(torch.bfloat16)
    norm_weight = (1 + torch.randn(h, generator=gen, device=DEVICE) / 4).to(torch.bfloat16)
    w = torch.randn(e, h, generator=gen, device=DEVICE)
    normed, total, logits = gating.add_norm_router_logits(x, residual, norm_weight, 1e-6, w)
    want_h, want_total = ref.add_rms_norm(x, residual, norm_weight, 1e-6)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(normed, want_h, rtol=8e-3, atol=0)  # within a bf16 rounding: the sum's order
    torch.testing.assert_close(logits, ref.router_logits(want_h, w), rtol=1e-5, atol=1e-4)
    one = gating.add_norm_router_logits(x[:1], residual[:1], norm_weight, 1e-6, w)
    assert all(torch.equal(a, b[:1]) for a, b in zip(one, (normed, total, logits)))
    for tokens in (0, 16):
        monkeypatch.setattr(ops, "ADD_NORM_ROUTER_MAX_TOKENS", tokens)
        got = ops.add_rms_norm_router_logits(x, residual, norm_weight, 1e-6, w)
        assert torch.equal(got[1], want_total)
        if tokens and ON_GPU:  # the fused kernel; else add_rms_norm and then the router
            assert all(torch.equal(a, b) for a, b in zip(got, (normed, total, logits)))
        else:
            assert torch.equal(got[2], ops.router_logits(got[0], w))


def test_add_norm_router_logits_refuse_what_they_do_not_take(gen):
    x = torch.zeros(2, 64, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(8, 64, generator=gen, device=DEVICE)
    norm_weight = torch.ones(64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16-bit rows"):
        gating.add_norm_router_logits(x.float(), x.float(), norm_weight, 1e-6, w)
    with pytest.raises(ValueError, match="norm weight"):
        gating.add_norm_router_logits(x, x, norm_weight.float(), 1e-6, w)
    with pytest.raises(ValueError, match="residual"):
        gating.add_norm_router_logits(x, x[:1], norm_weight, 1e-6, w)
