"""Random MoE problems at real shapes for the benchmark and the autotuner (never zeros: they hide
unwritten outputs and can run faster than real data)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .roofline import ExpertShape
from .weights import ExpertWeights, quantize_experts


@dataclass(frozen=True)
class Batch:
    """One call's inputs: hidden [T, H] bf16, topk_ids [T, k] int64, topk_weights [T, k] float32."""

    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor

    def experts_hit(self, num_experts: int) -> int:
        ids = self.ids[(self.ids >= 0) & (self.ids < num_experts)]
        return int(ids.unique().numel())


def random_experts(shape: ExpertShape, quant: str, gen: torch.Generator, device: str = "cuda") -> ExpertWeights:
    """Weights scaled so activations stay O(1); built 8 experts at a time to bound float32 temporaries."""
    h, i = shape.hidden, shape.inter
    w13 = torch.empty(shape.experts, 2 * i, h, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(shape.experts, h, i, dtype=torch.bfloat16, device=device)
    for lo in range(0, shape.experts, 8):
        n = min(8, shape.experts - lo)
        w13[lo:lo + n] = torch.randn(n, 2 * i, h, generator=gen, device=device) / h**0.5
        w2[lo:lo + n] = torch.randn(n, h, i, generator=gen, device=device) / i**0.5
    weights = ExpertWeights(w13, w2)
    return weights if quant == "bf16" else quantize_experts(weights, quant)


def random_batch(shape: ExpertShape, num_tokens: int, gen: torch.Generator, device: str = "cuda") -> Batch:
    """Uniformly random distinct experts per token (a balanced trained gate), weights summing to one."""
    t, e, k = num_tokens, shape.experts, shape.top_k
    hidden = torch.randn(t, shape.hidden, generator=gen, device=device).to(torch.bfloat16)
    ids = torch.rand(t, e, generator=gen, device=device).argsort(dim=1)[:, :k].contiguous()
    w = torch.rand(t, k, generator=gen, device=device) + 0.1
    return Batch(hidden, ids, (w / w.sum(-1, keepdim=True)).contiguous())


def rotation(num_tokens: int) -> int:
    """Input sets per timed unit: enough different routings that a small batch's experts are not
    still in L2 from the previous call."""
    return 8 if num_tokens <= 64 else 2
