"""Shared helpers of the kernel tests: device choice, random MoE problems, error measure."""

from __future__ import annotations

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

# ||out - ref|| / ||ref|| against a float64 (or dequantised float32) reference. bf16 operands with a
# bf16 intermediate and output land near 3e-3; 1e-2 leaves room for longer reductions, and any
# unwritten (NaN) or misrouted row fails by orders of magnitude.
TOL = 1e-2
ROW_TOL = 3e-2  # the same measure per token row: one wrong row cannot hide in the total
# FP8 activations are quantised per 128-wide group after rounding (the SwiGLU output to bf16): where a value sits
# on a rounding boundary, the float32 reference and the kernel (another summation order) can round it apart and
# quantise a whole group on another step. At these small shapes that moved one row by 3.2% (seed 3865476078,
# 6 tokens, I 96: the reference against itself in float64 differed by as much, the kernel by 0.3%). A wrong or
# unwritten row is still off by orders of magnitude.
FP8_TOL, FP8_ROW_TOL = 2e-2, 6e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; any NaN or inf in out gives inf."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def row_errs(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-row relative errors (rows whose reference is zero compare absolutely)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    err = (out - ref).norm(dim=-1)
    scale = ref.norm(dim=-1)
    return torch.where(scale > 0, err / scale.clamp(min=1e-30), err).nan_to_num(nan=float("inf"))


def random_routing(t: int, e: int, k: int, g: torch.Generator, *, drop: float = 0.0):
    """Distinct experts per token (random, like a trained gate), weights summing to 1; a `drop`
    share of slots set to -1 (held elsewhere)."""
    ids = torch.rand(t, e, generator=g, device=DEVICE).argsort(dim=1)[:, :k].contiguous()
    w = torch.rand(t, k, generator=g, device=DEVICE) + 0.1
    w = w / w.sum(-1, keepdim=True)
    if drop:
        ids[torch.rand(t, k, generator=g, device=DEVICE) < drop] = -1
    return ids, w


def random_experts(e: int, h: int, i: int, g: torch.Generator, dtype=torch.bfloat16):
    """w13 [E, 2I, H], w2 [E, H, I] scaled so activations stay O(1)."""
    w13 = (torch.randn(e, 2 * i, h, generator=g, device=DEVICE) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g, device=DEVICE) / i**0.5).to(dtype)
    return w13, w2


def random_hidden(t: int, h: int, g: torch.Generator, dtype=torch.bfloat16):
    return torch.randn(t, h, generator=g, device=DEVICE).to(dtype)
