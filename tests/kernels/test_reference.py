"""The reference MoE ops against direct per-token loops."""

import torch

from moeserve.kernels import reference as ref


def _dense_moe(hidden, w13, w2, ids, weights):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                out[t] += weights[t, j] * ref.expert_mlp(hidden[t : t + 1], w13[e], w2[e])[0]
    return out


def test_fused_experts_matches_per_token_loop():
    g = torch.Generator().manual_seed(0)
    t, h, i, e, k = 13, 16, 8, 6, 3
    hidden = torch.randn(t, h, generator=g, dtype=torch.float64)
    w13 = torch.randn(e, 2 * i, h, generator=g, dtype=torch.float64)
    w2 = torch.randn(e, h, i, generator=g, dtype=torch.float64)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64)
    weights, ids = ref.softmax_topk(logits, k, renormalize=True)
    ids[0, 1] = -1  # an expert held elsewhere contributes nothing
    got = ref.fused_experts(hidden, w13, w2, ids, weights.double())
    torch.testing.assert_close(got, _dense_moe(hidden, w13, w2, ids, weights.double()))


def test_grouped_topk_only_picks_from_best_groups():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 16, generator=g)
    bias = torch.randn(16, generator=g) * 0.1
    weights, ids = ref.grouped_topk(
        logits, 4, n_group=4, topk_group=2, renormalize=True, correction_bias=bias, routed_scaling_factor=2.5
    )
    groups = ids // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)
    torch.testing.assert_close(weights.sum(-1), torch.full((32,), 2.5))


def test_permute_counts_and_order():
    ids = torch.tensor([[2, 0], [1, 2], [-1, 0]])
    order, counts, offsets = ref.permute(ids, 3)
    assert counts.tolist() == [2, 1, 2]
    assert offsets.tolist() == [0, 2, 3, 5]
    assert ids.reshape(-1)[order].tolist() == [0, 0, 1, 2, 2]
