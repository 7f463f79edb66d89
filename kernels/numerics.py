"""Rounding and FP8 activation quantisation shared by the expert kernels (fused_moe.py, moe_gemv.py).

The CPU interpreter truncates where the GPU rounds to nearest even; the helpers round explicitly
there, so that interpreter runs give the GPU's values.
"""

import torch
import triton
import triton.language as tl

from .launch import empty, interpreting
from .pdl import enter, launch_args

FP8_GROUP = 128  # activation and weight scale block along K (DeepSeek-V3)
QUANT_CODES = {"bf16": 0, "fp8": 1, "int8": 2}  # the expert kernels' QUANT constexpr, by weight format


def norm_operands_fit(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor) -> bool:
    """Whether a kernel that folds a decoder's add and RMSNorm in takes these operands: the residual of x's
    shape and dtype, a norm weight of x's dtype and width, both unit-strided along the features."""
    return (residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
            and norm_weight.shape == (x.shape[-1],) and norm_weight.dtype == x.dtype and norm_weight.stride(0) == 1)


def norm_operands_text(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                       weight: torch.Tensor) -> str:
    """The operands of such a call, for the message that refuses it."""
    return (f"x {tuple(x.shape)} {x.dtype}, residual {tuple(residual.shape)} {residual.dtype}, norm weight "
            f"{tuple(norm_weight.shape)} {norm_weight.dtype}, weight {tuple(weight.shape)} {weight.dtype}")


@triton.jit
def rtne_bf16(x):
    """x (float32) rounded to the bfloat16 grid, to nearest even. The CPU interpreter truncates when
    it converts float32 to bf16; rounding first makes its results those of the GPU."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rtne_e4m3(y):
    """y (float32, |y| <= 448) rounded to the e4m3 grid, to nearest even; for the interpreter, as above."""
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(y), 1e-30))), -6.0)
    step = tl.exp2(e - 3.0)
    return ((y / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2**23 rounds to an integer


@triton.jit
def quantize_group(x, INTERPRET: tl.constexpr):
    """Rows of x [R, 128] to e4m3 with one float32 scale each (amax / 448, DeepSeek-V3 act_quant)."""
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10) / 448.0
    q = tl.clamp(x / scale[:, None], -448.0, 448.0)
    if INTERPRET:
        q = rtne_e4m3(q)
    return q.to(tl.float8e4nv), scale


@triton.jit
def round_as(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (float32) rounded to dtype and back, as a store of it and a reload would give."""
    out = x.to(dtype).to(tl.float32)
    if INTERPRET:
        if dtype == tl.bfloat16:
            out = rtne_bf16(x)
    return out


@triton.jit
def add_rounded(x, r, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x + r in float32, rounded to dtype: the residual stream's next value, as norm_rope.add_rms_norm sums it."""
    return round_as(x.to(tl.float32) + r.to(tl.float32), dtype, INTERPRET)


@triton.jit
def norm_rounded(total, inv, nw, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """RMSNorm of the sums `total` by their inverse root mean squares `inv`, times the norm weight nw (all
    float32, broadcast by the caller), rounded as norm_rope.add_rms_norm rounds: the normalised value to dtype
    before the weight multiplies it, the product to dtype. Kernels that fold the norm in use this, so they
    give its bits."""
    return round_as(round_as(total * inv, dtype, INTERPRET) * nw, dtype, INTERPRET)


@triton.jit
def store_rounded(ptrs, x, mask, INTERPRET: tl.constexpr):
    if INTERPRET:
        if ptrs.dtype.element_ty == tl.bfloat16:
            x = rtne_bf16(x)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["R"])
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, R, K, stride_x, stride_q, stride_s,
                      INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    """x [R, K] -> e4m3 q [R, K] and scales s [R, cdiv(K, 128)], one 128-wide group per program column."""
    enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    ok = (rows < R)[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    q, scale = quantize_group(x, INTERPRET)
    tl.store(q_ptr + r64[:, None] * stride_q + cols[None, :], q, mask=ok)
    tl.store(s_ptr + r64 * stride_s + tl.program_id(1), scale, mask=rows < R)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] bf16 -> (e4m3 [R, K], float32 scales [R, cdiv(K, 128)]), as the FP8 GEMMs quantise."""
    r, k = x.shape
    q = empty(r, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = empty(r, triton.cdiv(k, FP8_GROUP), dtype=torch.float32, device=x.device)
    block_r = 16
    _act_quant_kernel[(triton.cdiv(r, block_r), triton.cdiv(k, FP8_GROUP))](
        x, q, s, r, k, x.stride(0), q.stride(0), s.stride(0), INTERPRET=interpreting(), BLOCK_R=block_r, num_warps=4,
        **launch_args(x))
    return q, s
