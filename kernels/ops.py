"""The one place that chooses how MoE ops run: Triton kernels on CUDA, the plain-torch reference elsewhere.

Models and expert groups call these functions and never import a kernel or the reference directly.
"""

from __future__ import annotations

import torch

from . import reference


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of the routed experts for hidden [T, H]; see kernels/reference.py for layouts."""
    return reference.fused_experts(hidden, w13, w2, topk_ids, topk_weights)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax gating: (weights [T, k] float32, ids [T, k] int64)."""
    return reference.softmax_topk(logits, k, renormalize)


def grouped_topk(logits: torch.Tensor, k: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited gating (DeepSeek-V2/V3); keyword arguments as reference.grouped_topk."""
    return reference.grouped_topk(logits, k, **kwargs)
