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
from .pdl import enter, launch_args


@triton.jit
def _rms_scaled(x, w_ptr, d, d_ok, D: tl.constexpr, eps):
    """RMSNorm of the rows of x [R, BLOCK_D] times the weight, in float32, rounded as
    reference.rms_norm rounds: normalised in float32, cast to x's dtype, then multiplied by w."""
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=1) / D + eps)
    y = (x32 * inv[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    return y * w[None, :]


@triton.jit(do_not_specialize=["rows"])
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, r_ptr, sum_ptr, rows, stride_x, stride_r, eps, D: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
    """out = RMSNorm(x) * w; ADD: x + r first (rounded to x's dtype, as torch adds), the sum also
    written to sum_ptr (the residual stream's next value)."""
    enter(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < rows
    d_ok = d < D
    ok = r_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + d[None, :], mask=ok, other=0.0)
    if ADD:
        res = tl.load(r_ptr + r[:, None].to(tl.int64) * stride_r + d[None, :], mask=ok, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + r[:, None].to(tl.int64) * D + d[None, :], x, mask=ok)
    y = _rms_scaled(x, w_ptr, d, d_ok, D, eps)
    tl.store(out_ptr + r[:, None].to(tl.int64) * D + d[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # a view unless the leading dimensions do not collapse
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_norm(x2, weight, out, eps, residual=None, total=None) -> None:
    rows, d = x2.shape
    if rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 4096 // block_d))
    warps = 4 if block_d * block_r <= 4096 else 8
    add = residual is not None
    _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        x2, weight, out, residual if add else x2, total if add else out, rows, x2.stride(0),
        residual.stride(0) if add else 0, eps, D=d, BLOCK_R=block_r, BLOCK_D=block_d, ADD=add, num_warps=warps,
        **launch_args(x2))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x in float32) cast to x's dtype, over the last dimension; any leading shape."""
    x2 = _rows(x)
    out = empty(x2.shape[0], x2.shape[1], dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch_norm(x2, weight, out, eps)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one launch; the sum in x's dtype, as torch adds."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must match")
    x2, r2 = _rows(x), _rows(residual)
    out = empty(x2.shape[0], x2.shape[1], dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = empty(x2.shape[0], x2.shape[1], dtype=x.dtype, device=x.device)
    _launch_norm(x2, weight, out, eps, r2, total)
    return out.view(x.shape), total.view(x.shape)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, stride_ct,
                   HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   PDL: tl.constexpr):
    enter(PDL)
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
                                                    BLOCK_HALF=block_half, num_warps=4, **launch_args(x))
    return out


@triton.jit
def _norm_rope_heads(row, stride_h, heads, hb, w_ptr, c, s, eps, NORM: tl.constexpr, HALF: tl.constexpr,
                     INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Heads hb*BLOCK_H.. of one token's row: RMSNorm (NORM) as _rms_norm_kernel rounds it, then the
    rotation as _rotary_kernel computes it. Returns the two rotated halves (float32), the heads,
    the element offsets of each half and the mask."""
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    ok = (h < heads)[:, None] & i_ok[None, :]
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    src = row + h[:, None] * stride_h
    x1 = tl.load(src + first[None, :], mask=ok, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = tl.load(src + second[None, :], mask=ok, other=0.0).to(tl.float32)
    if NORM:
        inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + first, mask=i_ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + second, mask=i_ok, other=0.0).to(tl.float32)
        x1 = ((x1 * inv[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
        x2 = ((x2 * inv[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * s[None, :]
    o2 = x2 * c[None, :] + x1 * s[None, :]
    return o1, o2, h, first, second, ok


@triton.jit
def _token_cos_sin(cos_ptr, sin_ptr, t, stride_ct, out_ptr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token t's cos and sin (float32), cast to the activations' (out_ptr's) dtype first, as the
    reference does before multiplying."""
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    dtype = out_ptr.dtype.element_ty
    c = tl.load(cos_ptr + t * stride_ct + i, mask=i_ok, other=0.0).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + i, mask=i_ok, other=0.0).to(dtype).to(tl.float32)
    return c, s


@triton.jit
def _rope_queries(q_ptr, q_out_ptr, t64, j, hq, stride_qt, stride_qh, w_ptr, c, s, eps, NORM: tl.constexpr,
                  HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Query heads j*BLOCK_H.. of token t64: normed (NORM), rotated, written to q_out [T, hq, 2 * HALF]."""
    o1, o2, h, first, second, ok = _norm_rope_heads(q_ptr + t64 * stride_qt, stride_qh, hq, j, w_ptr, c, s, eps,
                                                    NORM, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF)
    dtype = q_out_ptr.dtype.element_ty
    q_dst = q_out_ptr + (t64 * hq + h[:, None]) * (2 * HALF)
    tl.store(q_dst + first[None, :], o1.to(dtype), mask=ok)
    tl.store(q_dst + second[None, :], o2.to(dtype), mask=ok)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr, kc_ptr, vc_ptr, slot_ptr,
                       hq, hk, q_blocks, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                       eps, NORM: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    """Token t (axis 0); axis 1: q_blocks blocks of query heads, then blocks of key/value heads.
    Queries: normed, rotated, written to q_out [T, hq, D]. Keys: normed, rotated, written at the
    token's cache slot; values copied there. Caches [slots, hk, D] contiguous."""
    enter(PDL)
    t = tl.program_id(0)
    j = tl.program_id(1)
    dtype = q_out_ptr.dtype.element_ty
    c, s = _token_cos_sin(cos_ptr, sin_ptr, t, stride_ct, q_out_ptr, HALF, BLOCK_HALF)
    t64 = t.to(tl.int64)
    if j < q_blocks:
        _rope_queries(q_ptr, q_out_ptr, t64, j, hq, stride_qt, stride_qh, qw_ptr, c, s, eps, NORM, HALF, INTERLEAVED,
                      BLOCK_H, BLOCK_HALF)
    else:
        o1, o2, h, first, second, ok = _norm_rope_heads(k_ptr + t64 * stride_kt, stride_kh, hk, j - q_blocks, kw_ptr,
                                                        c, s, eps, NORM, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cache_dtype = kc_ptr.dtype.element_ty
        at = (slot * hk + h[:, None]) * (2 * HALF)
        tl.store(kc_ptr + at + first[None, :], o1.to(dtype).to(cache_dtype), mask=ok)
        tl.store(kc_ptr + at + second[None, :], o2.to(dtype).to(cache_dtype), mask=ok)
        v_row = v_ptr + t64 * stride_vt + h[:, None] * stride_vh
        v1 = tl.load(v_row + first[None, :], mask=ok, other=0.0)
        v2 = tl.load(v_row + second[None, :], mask=ok, other=0.0)
        tl.store(vc_ptr + at + first[None, :], v1.to(cache_dtype), mask=ok)
        tl.store(vc_ptr + at + second[None, :], v2.to(cache_dtype), mask=ok)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                   eps: float = 0.0) -> torch.Tensor:
    """One launch for what attention does to a step's new q, k, v [T, heads, D] (last dimension
    contiguous) before attending: RMSNorm of q and k over D (when weights are given), the rotary
    embedding of both by cos, sin [T, D/2], and k and v stored at slot_mapping [T] of the caches
    [blocks, block_size, kv heads, D]. Returns the rotated q [T, heads, D]; the semantics of
    reference.rope_and_cache."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_and_cache writes contiguous KV caches")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cos, sin = cos.contiguous(), sin.contiguous()
    out = empty(t, hq, d, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(hq, hk)), 2048 // block_half))
    q_blocks = triton.cdiv(hq, block_h)
    norm = q_weight is not None
    _rope_cache_kernel[(t, q_blocks + triton.cdiv(hk, block_h))](
        q, k, v, q_weight if norm else q, k_weight if norm else k, cos, sin, out, k_cache, v_cache, slot_mapping,
        hq, hk, q_blocks, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        eps, NORM=norm, HALF=half, INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
        **launch_args(q))
    return out


@triton.jit
def _mla_rope_cache_kernel(q_ptr, lat_ptr, kpe_ptr, w_ptr, cos_ptr, sin_ptr, q_out_ptr, cache_ptr, slot_ptr,
                           hq, q_blocks, stride_qt, stride_qh, stride_lt, stride_kt, stride_ct, eps,
                           L: tl.constexpr, BLOCK_L: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    """Token t (axis 0); axis 1: q_blocks blocks of query heads, then one program for the token's
    cache row. Queries' rope parts: rotated, written to q_out [T, hq, 2 * HALF]. The row: the latent
    RMSNorm-ed (rounded as _rms_norm_kernel rounds it), then the rotated k_pe, at the token's slot of
    the cache [slots, L + 2 * HALF]."""
    enter(PDL)
    t = tl.program_id(0)
    j = tl.program_id(1)
    dtype = q_out_ptr.dtype.element_ty
    c, s = _token_cos_sin(cos_ptr, sin_ptr, t, stride_ct, q_out_ptr, HALF, BLOCK_HALF)
    t64 = t.to(tl.int64)
    if j < q_blocks:
        _rope_queries(q_ptr, q_out_ptr, t64, j, hq, stride_qt, stride_qh, w_ptr, c, s, eps, False, HALF, INTERLEAVED,
                      BLOCK_H, BLOCK_HALF)
    else:
        cache_dtype = cache_ptr.dtype.element_ty
        row = cache_ptr + tl.load(slot_ptr + t).to(tl.int64) * (L + 2 * HALF)
        d = tl.arange(0, BLOCK_L)
        d_ok = d < L
        x = tl.load(lat_ptr + t64 * stride_lt + d[None, :], mask=d_ok[None, :], other=0.0)  # one row
        y = _rms_scaled(x, w_ptr, d, d_ok, L, eps)
        tl.store(row + d[None, :], y.to(w_ptr.dtype.element_ty).to(cache_dtype), mask=d_ok[None, :])
        k1, k2, _, k_first, k_second, k_ok = _norm_rope_heads(kpe_ptr + t64 * stride_kt, 0, 1, 0, w_ptr, c, s, eps,
                                                              False, HALF, INTERLEAVED, 1, BLOCK_HALF)  # one "head"
        tl.store(row + L + k_first[None, :], k1.to(dtype).to(cache_dtype), mask=k_ok)
        tl.store(row + L + k_second[None, :], k2.to(dtype).to(cache_dtype), mask=k_ok)


def mla_rope_and_cache(q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, weight: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> torch.Tensor:
    """One launch for what MLA does to a step's new rows before attending: the rotary embedding of
    the queries' rope parts q_pe [T, heads, R], and the cache row [RMSNorm(latent [T, L]) by weight,
    rotated k_pe [T, R]] stored at slot_mapping [T] of cache [blocks, block_size, L + R]. Returns
    the rotated q_pe [T, heads, R]; the semantics of reference.mla_rope_and_cache."""
    t, hq, r = q_pe.shape
    lat = latent.shape[1]
    if not cache.is_contiguous() or cache.shape[-1] != lat + r:
        raise ValueError(f"mla_rope_and_cache writes a contiguous cache of rows {lat} + {r} wide, "
                         f"got {tuple(cache.shape)}")
    q_pe, latent, k_pe = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_pe, latent, k_pe))
    cos, sin = cos.contiguous(), sin.contiguous()
    out = empty(t, hq, r, dtype=q_pe.dtype, device=q_pe.device)
    if t == 0:
        return out
    half = r // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(hq), 2048 // block_half))
    q_blocks = triton.cdiv(hq, block_h)
    _mla_rope_cache_kernel[(t, q_blocks + 1)](
        q_pe, latent, k_pe, weight, cos, sin, out, cache, slot_mapping, hq, q_blocks, q_pe.stride(0), q_pe.stride(1),
        latent.stride(0), k_pe.stride(0), cos.stride(0), eps, L=lat, BLOCK_L=triton.next_power_of_2(lat), HALF=half,
        INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4, **launch_args(q_pe))
    return out
