"""The one place that chooses how the kernel ops run (MoE experts, gating, paged decode attention):
Triton kernels on CUDA, the plain-torch reference elsewhere.

Models and expert groups call these functions and never import a kernel or the reference directly.
The Triton modules are imported on the first CUDA call only, so CPU-only machines never need Triton
(and the test suite can switch on its interpreter before any kernel is defined).
"""

from __future__ import annotations

import torch

from . import reference
from .weights import ExpertWeights, load_experts, quantize_experts, stack_experts

__all__ = [
    "ExpertWeights",
    "fused_experts",
    "fused_experts_quantized",
    "grouped_topk",
    "load_experts",
    "paged_decode_attention",
    "quantize_experts",
    "softmax_topk",
    "stack_experts",
]


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of the routed experts for hidden [T, H]; see kernels/reference.py for layouts."""
    if _on_gpu(hidden):
        from . import fused_moe

        return fused_moe.fused_experts(hidden, ExpertWeights(w13, w2), topk_ids, topk_weights)
    return reference.fused_experts(hidden, w13, w2, topk_ids, topk_weights)


def fused_experts_quantized(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """fused_experts for any ExpertWeights (bf16, FP8 block-scaled or INT8 per-channel)."""
    if _on_gpu(hidden):
        from . import fused_moe

        return fused_moe.fused_experts(hidden, weights, topk_ids, topk_weights)
    if weights.quant == "fp8":
        return reference.fused_experts_fp8(hidden, weights.w13, weights.w13_scale, weights.w2,
                                           weights.w2_scale, topk_ids, topk_weights)
    if weights.quant == "int8":
        return reference.fused_experts_int8(hidden, weights.w13, weights.w13_scale, weights.w2,
                                            weights.w2_scale, topk_ids, topk_weights)
    return reference.fused_experts(hidden, weights.w13, weights.w2, topk_ids, topk_weights)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax gating: (weights [T, k] float32, ids [T, k] int64)."""
    if _on_gpu(logits):
        from . import gating

        return gating.softmax_topk(logits, k, renormalize)
    return reference.softmax_topk(logits, k, renormalize)


def grouped_topk(logits: torch.Tensor, k: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited gating (DeepSeek-V2/V3); keyword arguments as reference.grouped_topk."""
    if _on_gpu(logits):
        from . import gating

        return gating.grouped_topk(logits, k, **kwargs)
    return reference.grouped_topk(logits, k, **kwargs)


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
    """One query per sequence over its paged KV cache; see kernels/reference.py for the layouts."""
    if _on_gpu(q):
        from . import decode_attention

        return decode_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                       max_len, sliding_window)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_len,
                                            sliding_window)
