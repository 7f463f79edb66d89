"""Triton RMSNorm and rotary embedding: one launch each where plain torch takes four to nine.

In plain torch an RMSNorm in float32 is a cast up, the norm, a cast down and the weight's multiply,
and a rotary embedding is casts of cos and sin, four products, two sums and a concatenation, each a
kernel that reads and writes the whole tensor. On a GPU at batch 64 those ~30 launches per layer
cost more than the layer's attention, and in a prefill step of 8192 tokens their memory traffic was
a third of the step (benchmarks/profile_engine.py). Each kernel here reads its input once and writes
its output once, computing in float32 with the same roundings as kernels/reference.py where they
matter (RMSNorm: the normalised value is cast to the input's dtype before the weight multiplies it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, rows, stride_x, eps, D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < rows
    d_ok = d < D
    ok = r_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + d[None, :], mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = (x * inv[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r[:, None].to(tl.int64) * D + d[None, :], (y * w[None, :]).to(out_ptr.dtype.element_ty),
             mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x in float32) cast to x's dtype, over the last dimension; any leading shape."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)  # a view unless the leading dimensions do not collapse
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = empty(rows, d, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows == 0:
        return out.view(x.shape)
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 4096 // block_d))
    warps = 4 if block_d * block_r <= 4096 else 8
    _rms_norm_kernel[(triton.cdiv(rows, block_r),)](x2, weight, out, rows, x2.stride(0), eps, D=d,
                                                    BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, stride_ct,
                   HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    ok = (h < heads)[:, None] & i_ok[None, :]
    # cos and sin are cast to x's dtype first, as the reference does before multiplying
    c = tl.load(cos_ptr + t * stride_ct + i, mask=i_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + i, mask=i_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    row = x_ptr + t.to(tl.int64) * stride_xt + h[:, None] * stride_xh
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    x1 = tl.load(row + first[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + second[None, :], mask=ok, other=0.0).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * s[None, :]
    o2 = x2 * c[None, :] + x1 * s[None, :]
    dst = out_ptr + (t.to(tl.int64) * heads + h[:, None]) * (2 * HALF)
    tl.store(dst + first[None, :], o1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + second[None, :], o2.to(out_ptr.dtype.element_ty), mask=ok)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [T, heads, dim] (last dimension contiguous) by cos, sin [T, dim/2]; a new contiguous tensor."""
    t, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = empty(t, heads, dim, dtype=x.dtype, device=x.device)
    if t == 0 or heads == 0:
        return out
    half = dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(heads), 2048 // block_half))
    _rotary_kernel[(t, triton.cdiv(heads, block_h))](x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0),
                                                    HALF=half, INTERLEAVED=interleaved, BLOCK_H=block_h,
                                                    BLOCK_HALF=block_half, num_warps=4)
    return out
