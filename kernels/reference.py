"""Plain-torch reference MoE ops: the oracle for the Triton kernels and the path on CPU.

Conventions shared by every MoE op in moeserve:
- hidden states are [T, H] (T tokens, flattened over the batch);
- routing is (topk_ids [T, k] int64, topk_weights [T, k] float32); the weights are final, i.e.
  any renormalisation and DeepSeek's `routed_scaling_factor` are already applied;
- expert weights are stacked per layer: w13 [E, 2I, H] (rows 0..I-1 gate_proj, I..2I-1 up_proj)
  and w2 [E, H, I] (down_proj), the nn.Linear (out, in) layout of the HF checkpoints;
- an expert id of -1 in topk_ids means "not held here" and contributes nothing (an expert group
  receives rows whose other experts live elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gate logits x [T, H] @ weight [E, H]^T, computed in float32."""
    return F.linear(x.float(), weight.float())


def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, then top-k (Mixtral, Qwen3-MoE, DeepSeek-V2 greedy)."""
    scores = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(scores, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_topk(
    logits: torch.Tensor,
    k: int,
    *,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scoring: str = "sigmoid",
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k (DeepSeek-V3 `noaux_tc` with sigmoid; DeepSeek-V2 `group_limited_greedy`).

    Experts are split into `n_group` equal groups; only the `topk_group` best groups are eligible.
    With a correction bias (V3), selection uses score + bias, groups are ranked by the sum of their
    two best biased scores, and the weights are the unbiased scores. Without it (V2), groups are
    ranked by their best score.
    """
    t, e = logits.shape
    if scoring == "sigmoid":
        scores = torch.sigmoid(logits.float())
    elif scoring == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)
    else:
        raise ValueError(f"unknown scoring function {scoring!r}; expected 'sigmoid' or 'softmax'")
    choice = scores if correction_bias is None else scores + correction_bias.float().unsqueeze(0)
    grouped = choice.view(t, n_group, e // n_group)
    if correction_bias is None:
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    group_idx = torch.topk(group_scores, topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    masked = choice.masked_fill(expert_mask == 0, float("-inf"))
    ids = torch.topk(masked, k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def permute(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert.

    Returns (order, counts, offsets): `order` [N] indexes the flattened topk_ids for the pairs held
    here (ids in [0, num_experts)), grouped by expert in ascending order and stable within an
    expert; counts [E] is the number of pairs per expert; offsets [E+1] their exclusive prefix sum.
    """
    flat = topk_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    keys = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    order = order[: int(counts.sum())]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    return order, counts, offsets


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: down(silu(gate(x)) * up(x)) for x [N, H], w13 [2I, H], w2 [H, I]."""
    gate_up = x @ w13.t()
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


def grouped_expert_mlp(
    x_sorted: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Run each expert on its contiguous slice of `x_sorted` (rows grouped by `offsets`)."""
    out = torch.empty(x_sorted.shape[0], w2.shape[1], dtype=x_sorted.dtype, device=x_sorted.device)
    bounds = offsets.tolist()
    for e in range(w13.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = expert_mlp(x_sorted[lo:hi], w13[e], w2[e])
    return out


def combine(
    expert_out: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Weighted sum of expert outputs back in token order: out[t] = sum_j w[t, j] * y[t, j]."""
    k = topk_weights.shape[1]
    token = order // k
    w = topk_weights.reshape(-1)[order].to(expert_out.dtype).unsqueeze(-1)
    acc = torch.promote_types(expert_out.dtype, torch.float32)  # accumulate in at least fp32
    out = torch.zeros(num_tokens, expert_out.shape[1], dtype=acc, device=expert_out.device)
    out.index_add_(0, token, (expert_out * w).to(acc))
    return out.to(expert_out.dtype)


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert output for hidden [T, H]: permute, grouped SwiGLU MLP, weighted combine."""
    num_experts = w13.shape[0]
    order, _, offsets = permute(topk_ids, num_experts)
    k = topk_ids.shape[1]
    x_sorted = hidden[order // k]
    y = grouped_expert_mlp(x_sorted, w13, w2, offsets)
    return combine(y, order, topk_weights, hidden.shape[0])


def block_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Dequantise a block-scaled weight (DeepSeek-V3 FP8: e4m3 values times 128x128 `weight_scale_inv`).

    weight [..., N, K]; scale_inv [..., ceil(N/bn), ceil(K/bk)]. Returns float32.
    """
    bn, bk = block
    n, kk = weight.shape[-2:]
    s = scale_inv.float().repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return weight.float() * s[..., :n, :kk]


def act_quant_fp8(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantisation of activations x [..., K] (DeepSeek-V3 `act_quant`).

    Each row's K values are cut into groups of `group` (the last may be shorter); a group's scale is
    its absolute maximum over 448 (e4m3's largest value). Returns (e4m3 values [..., K], float32
    scales [..., ceil(K/group)]); values times their group's scale give back x approximately.
    """
    k = x.shape[-1]
    nb = -(-k // group)
    padded = F.pad(x.float(), (0, nb * group - k)).unflatten(-1, (nb, group))
    scale = padded.abs().amax(dim=-1).clamp(min=1e-10) / 448.0
    q = (padded / scale.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :k], scale


def act_dequant_fp8(q: torch.Tensor, scale: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Inverse of act_quant_fp8, in float32."""
    k = q.shape[-1]
    return q.float() * scale.repeat_interleave(group, dim=-1)[..., :k]


def dequant_w13_fp8(w13: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Dequantise stacked FP8 gate/up weights w13 [E, 2I, H] whose scales [E, 2*ceil(I/block), ...]
    hold the gate's blocks then the up's (each checkpoint tensor keeps its own block grid)."""
    i = w13.shape[-2] // 2
    gb = -(-i // block)
    gate = block_dequant(w13[..., :i, :], scale_inv[..., :gb, :], (block, block))
    up = block_dequant(w13[..., i:, :], scale_inv[..., gb:, :], (block, block))
    return torch.cat([gate, up], dim=-2)


def dequant_int8_channel(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantise an INT8 weight [..., N, K] with one scale per output row, scale [..., N]; float32."""
    return weight.float() * scale.float().unsqueeze(-1)


def fused_experts_fp8(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts with FP8 block-scaled weights (layouts in kernels/weights.py), computed as the
    FP8 kernels do: activations quantised per 1x128 group before each GEMM, the SwiGLU output
    rounded to hidden's dtype before its quantisation, float32 arithmetic elsewhere."""
    w13f = dequant_w13_fp8(w13, w13_scale_inv)
    w2f = block_dequant(w2, w2_scale_inv)
    num_experts = w13.shape[0]
    order, _, offsets = permute(topk_ids, num_experts)
    k = topk_ids.shape[1]
    x = act_dequant_fp8(*act_quant_fp8(hidden[order // k]))
    y = torch.empty(x.shape[0], w2.shape[1], dtype=torch.float32, device=hidden.device)
    bounds = offsets.tolist()
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            gate, up = (x[lo:hi] @ w13f[e].t()).chunk(2, dim=-1)
            act = (F.silu(gate) * up).to(hidden.dtype)
            y[lo:hi] = act_dequant_fp8(*act_quant_fp8(act)) @ w2f[e].t()
    return combine(y, order, topk_weights.float(), hidden.shape[0]).to(hidden.dtype)


def fused_experts_int8(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts with INT8 weight-only experts (per-row scales), in float32 on the dequantised
    weights; returns hidden's dtype."""
    w13f = dequant_int8_channel(w13, w13_scale)
    w2f = dequant_int8_channel(w2, w2_scale)
    return fused_experts(hidden.float(), w13f, w2f, topk_ids, topk_weights.float()).to(hidden.dtype)


GATHER_BYTES = 1 << 28  # the reference decode attention gathers at most this much per call


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_len: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query per sequence over its paged cache: q [B, Hq, Dk], caches [blocks, block_size, Hk, D]
    -> [B, Hq, Dv] in q's dtype. Each sequence's first context_lens[b] cached rows (the last
    sliding_window of them, if set) are attended; scores and softmax in float32, the probabilities
    cast to the values' dtype before the weighted sum (as SDPA does)."""
    b, hq, _ = q.shape
    page, hk = k_cache.shape[1], k_cache.shape[2]
    length = max(1, max_len)
    row_bytes = length * hk * (k_cache.shape[-1] + v_cache.shape[-1]) * 4
    step = max(1, GATHER_BYTES // row_bytes)
    if b > step:  # bound the padded gather: a few sequences at a time
        return torch.cat([paged_decode_attention(q[i:i + step], k_cache, v_cache, block_tables[i:i + step],
                                                 context_lens[i:i + step], scale, max_len, sliding_window)
                          for i in range(0, b, step)])
    blocks = block_tables[:, : (length + page - 1) // page].long()
    slots = (blocks[:, :, None] * page + torch.arange(page, device=q.device)).reshape(b, -1)[:, :length]
    keys = k_cache.reshape(-1, hk, k_cache.shape[-1])[slots].float()  # [B, L, Hk, Dk]
    values = v_cache.reshape(-1, hk, v_cache.shape[-1])[slots]  # [B, L, Hk, Dv]
    qg = q.float().view(b, hk, hq // hk, -1)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys) * scale
    pos = torch.arange(length, device=q.device)[None, :]
    lens = context_lens.to(q.device).long()[:, None]
    visible = pos < lens
    if sliding_window is not None:
        visible &= pos >= lens - sliding_window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.einsum("bkgl,blkd->bkgd", probs, values)
    return out.reshape(b, hq, -1).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Prompt chunks over their paged caches, sequence by sequence: q [T, Hq, Dk] (each sequence's
    query_lens[i] new tokens, back to back; their KV already written), caches [blocks, block_size,
    Hk, D] -> [T, Hq, Dv] in q's dtype. Token j of sequence i's chunk is at position
    context_lens[i] - query_lens[i] + j and sees the keys at positions up to its own (the last
    sliding_window of them, if set); float32 scores and softmax, probabilities cast to the values'
    dtype before the weighted sum."""
    t, hq, _ = q.shape
    page, hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(t, hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    first = 0
    for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[i, pos // page].long() * page + pos % page
        keys = k_cache.reshape(-1, hk, k_cache.shape[-1])[slots].float()  # [L, Hk, Dk]
        values = v_cache.reshape(-1, hk, v_cache.shape[-1])[slots]
        qg = q[first:first + q_len].float().view(q_len, hk, hq // hk, -1)
        scores = torch.einsum("tkgd,lkd->tkgl", qg, keys) * scale
        q_pos = pos[ctx - q_len:, None]
        visible = pos[None, :] <= q_pos
        if sliding_window is not None:
            visible &= pos[None, :] > q_pos - sliding_window
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        o = torch.einsum("tkgl,lkd->tkgd", probs, values)
        out[first:first + q_len] = o.reshape(q_len, hq, -1).to(q.dtype)
        first += q_len
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension, normalised in float32 and cast to
    x's dtype before the weight multiplies it (as the HF implementations do)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a pre-norm layer's residual add and next norm."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [T, heads, dim] by cos, sin [T, dim/2] (float32, cast to x's dtype first): halves
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), the halves being the two halves of the head or,
    interleaved, its even and odd elements (which stay interleaved)."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                   eps: float = 0.0) -> torch.Tensor:
    """Attention's work on a step's new q, k, v [T, heads, D] before attending: RMSNorm of q and k
    (when weights are given), the rotary embedding of both, k and v stored at slot_mapping [T] of the
    caches [blocks, block_size, kv heads, D] (in the caches' dtype). Returns the rotated q."""
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    q, k = apply_rotary(q, cos, sin, interleaved), apply_rotary(k, cos, sin, interleaved)
    for cache, x in ((k_cache, k), (v_cache, v)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping.to(cache.device), x.to(cache.dtype))
    return q


def mla_rope_and_cache(q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, weight: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> torch.Tensor:
    """MLA's work on a step's new rows before attending: the rotary embedding of the queries' rope
    parts q_pe [T, heads, R]; the cache row [rms_norm(latent [T, L]), rotated k_pe [T, R]] stored at
    slot_mapping [T] of cache [blocks, block_size, L + R] (in the cache's dtype). Returns the rotated q_pe."""
    q_pe = apply_rotary(q_pe, cos, sin, interleaved)
    k_pe = apply_rotary(k_pe.unsqueeze(1), cos, sin, interleaved).squeeze(1)
    row = torch.cat([rms_norm(latent, weight, eps), k_pe], dim=-1)
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping.to(cache.device), row.to(cache.dtype))
    return q_pe


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's SiLU(gate) * up, as the HF MLPs compute it."""
    return F.silu(gate) * up
