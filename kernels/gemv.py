"""Triton GEMV for decode-size linear layers: y = x @ w.T (+ b) for a few rows of x.

At batch 1 an H200 decode step of Qwen3-30B-A3B spent 16 us per layer in cuBLAS for the attention's
two projections (q/k/v as one GEMV of 21 MB, 7.6 us; o_proj of 17 MB, split-K, 7.1 + 1.7 us for its
reduction), against about 9 us of HBM time for their bytes. Both are launched plainly, so they also
break the chain of programmatic dependent launches (kernels/pdl.py) that the Triton kernels around
them form.

Here each program owns BLOCK_N output columns and holds their whole weight rows ([BLOCK_N, K], K
padded to a power of two) in registers. It loads them *before* it waits for the previous kernel:
weights are never written by a step, so with PDL the weight stream of this GEMV overlaps the tail
of the kernel before it. Then it waits, reads the few rows of x and writes each row's BLOCK_N
outputs, accumulated in float32. Every row is computed alone, in the same order, so a row's result
does not depend on how many rows the call has (a CUDA graph padded to 8 rows gives the eager
step's values for the same rows).

With a norm (add_norm_linear, one row), the kernel also takes the decoder's add and RMSNorm before
it: every program adds the residual to x and normalises the sum itself (a row of a few thousand
values, already in its registers), rounding as norm_rope.add_rms_norm does, and the first program
writes the sum (the residual stream's next value). At batch 1 that removes the norm's launch (1.7 us
alone on an H200), but gains less: with PDL this GEMV already loaded its weights while the norm ran.
Qwen3-30B-A3B's batch-1 step went 2.57 -> 2.55 ms (docs/benchmarks.md, fourteenth session).

From two rows on, linear_mma: the same weight stream through tensor cores. Each row reduced on its
own in float32 (the GEMV above) costs a multiply-add per weight and row on the CUDA cores, which at
eight rows made the GEMV 1.2-2.2x cuBLAS's time on an H200. Here a program owns BLOCK_N output
columns and walks K in BLOCK_K steps, one [BLOCK_N, BLOCK_K] weight tile against the [BLOCK_K, 16]
transposed rows of x (padded to 16) per step: the weights are the MMA's M side, so 16 or fewer rows
waste no weight bytes, and no split of K (cuBLAS's choice for o_proj at 16 rows, a second launch
for its reduction) is needed. Every row's sum runs over the same K steps in the same order whatever
the number of rows, so a row's result does not depend on the batch either. Launched with PDL like
the rest of this package, so it keeps the chain of dependent launches that a cuBLAS call breaks.
Alone it beat cuBLAS on every decode projection of the benchmark models but one; inside a decode step
it did not everywhere, so ops.linear takes it only for the weights where the step gained (kernels/ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty, interpreting
from .numerics import add_rounded, norm_operands_fit, norm_operands_text, norm_rounded
from .pdl import enter, launch_args

MAX_ROWS = 8  # rows of x per call: decode batches up to here
MMA_ROWS = 16  # rows of x per linear_mma call (the tensor-core tile's N side)
MAX_K = 8192  # input width: a program's weight rows stay in registers
TILE = 8192  # weight elements per program (BLOCK_N * padded K)
WARPS = 4


@triton.jit
def _add_norm(x, r_ptr, nw, sum_ptr, k, k_ok, K, eps, INTERPRET: tl.constexpr):
    """RMSNorm(x + r) * nw for one row x [BLOCK_K] (16-bit), rounded as norm_rope's kernel rounds: the
    sum to x's dtype, the normalised value to x's dtype before the weight multiplies it, the product
    to x's dtype. The first program stores the sum at sum_ptr."""
    s = add_rounded(x, tl.load(r_ptr + k, mask=k_ok, other=0.0), x.dtype, INTERPRET)
    tl.store(sum_ptr + k, s.to(x.dtype), mask=tl.where(tl.program_id(0) == 0, k_ok, False))
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / K + eps)
    return norm_rounded(s, inv, nw, x.dtype, INTERPRET)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, nw_ptr, sum_ptr, M, N, K, stride_xm, stride_wn, stride_ym, eps,
                 HAS_BIAS: tl.constexpr, NORM: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y[m] = x[m] @ w.T (+ b) for the BLOCK_N columns of this program. NORM (M = 1): x is first
    replaced by RMSNorm(x + r) * nw (_add_norm)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    n_ok = n < N
    k_ok = k < K
    # the weights first: nothing in a step writes them, so they may be read before the wait
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                other=0.0, eviction_policy="evict_first").to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if NORM:
        nw = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    enter(PDL)
    for m in range(M):
        x = tl.load(x_ptr + m * stride_xm + k, mask=k_ok, other=0.0)
        if NORM:
            x = _add_norm(x, r_ptr, nw, sum_ptr, k, k_ok, K, eps, INTERPRET)
        y = tl.sum(w * x.to(tl.float32)[None, :], axis=1)
        if HAS_BIAS:
            y += bias
        tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear() takes this call: 1..MAX_ROWS rows, K <= MAX_K, 16-bit floats, unit strides."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and x.shape[1] <= MAX_K and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.stride(1) == 1 and weight.stride(1) == 1)


def supports_add_norm(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether add_norm_linear takes this call: one row linear() takes, its residual (contiguous) and
    norm weight in x's dtype."""
    return supports(x, weight) and x.shape[0] == 1 and norm_operands_fit(x, residual, norm_weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, tile: int = TILE,
           num_warps: int = WARPS) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype, for calls supports() takes.
    tile (weight elements per program) and num_warps: the launch, for benchmarks/bench_gemv.py."""
    if not supports(x, weight):
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows of at most {MAX_K} 16-bit features matching the weight, "
                         f"got x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} {weight.dtype}")
    return _launch(x, weight, bias, tile, num_warps)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int, num_warps: int,
            norm: tuple | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias); norm = (residual, norm weight, eps, sum out): x normed first (one row)."""
    m, k = x.shape
    n = weight.shape[0]
    y = empty(m, n, dtype=x.dtype, device=x.device)
    block_k = triton.next_power_of_2(k)
    block_n = max(1, min(64, tile // block_k))
    residual, norm_weight, eps, total = norm if norm is not None else (x, x, 0.0, y)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, y, residual, norm_weight, total, m, n, k, x.stride(0),
        weight.stride(0), y.stride(0), eps, HAS_BIAS=bias is not None, NORM=norm is not None,
        INTERPRET=interpreting(), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **launch_args(x),
    )
    return y


def add_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None, *, tile: int = TILE,
                    num_warps: int = WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(h, weight, bias), x + residual) with h = norm_rope.add_rms_norm(x, residual, norm_weight,
    eps)[0], for one row x [1, K] that linear() takes and residual and norm_weight of x's dtype: one
    launch for the decoder's add, its next RMSNorm and the projection after it."""
    if not supports_add_norm(x, residual, norm_weight, weight):
        raise ValueError(f"add_norm_linear takes one row with its residual and norm weight in its dtype, got "
                         f"{norm_operands_text(x, residual, norm_weight, weight)}")
    total = empty(1, x.shape[1], dtype=x.dtype, device=x.device)
    return _launch(x, weight, bias, tile, num_warps, (residual, norm_weight, eps, total)), total


@triton.jit(do_not_specialize=["M"])
def _mma_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, nw_ptr, sum_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                stride_rm, stride_sm, eps,
                HAS_BIAS: tl.constexpr, NORM: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y[:M, n] = x[:M] @ w[n].T (+ b[n]) for the BLOCK_N columns n of this program: acc [BLOCK_N, ROWS]
    += w tile [BLOCK_N, BLOCK_K] @ x tile.T [BLOCK_K, ROWS], K in order. NORM: x is first replaced by
    RMSNorm(x + r) * nw, rounded as _add_norm rounds: a first pass over K takes each row's sum of squares
    (and the first program stores the sums x + r at sum_ptr), the second normalises each tile as it
    loads it."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, ROWS)
    kk = tl.arange(0, BLOCK_K)
    n_ok = n < N
    r_ok = r < M
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * stride_wn + kk[None, :]
    x_ptrs = x_ptr + r[None, :] * stride_xm + kk[:, None]
    acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    enter(PDL)
    if NORM:
        dtype = x_ptr.dtype.element_ty
        res_ptrs = r_ptr + r[None, :] * stride_rm + kk[:, None]
        squares = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = (kk < K - k0)[:, None] & r_ok[None, :]
            total = add_rounded(tl.load(x_ptrs + k0, mask=ok, other=0.0), tl.load(res_ptrs + k0, mask=ok, other=0.0),
                                dtype, INTERPRET)
            squares += tl.sum(total * total, axis=0)
            tl.store(sum_ptr + r[None, :] * stride_sm + (kk[:, None] + k0), total.to(dtype),
                     mask=tl.where(tl.program_id(0) == 0, ok, False))
        inv = 1.0 / tl.sqrt(squares / K + eps)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=r_ok[None, :], other=0.0)
        else:
            k_ok = kk < K - k0
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if NORM:  # the tile of RMSNorm(x + r) * nw, as the first pass rounded the sums
            k_in = kk < K - k0
            ok = k_in[:, None] & r_ok[None, :]
            total = add_rounded(x, tl.load(res_ptrs + k0, mask=ok, other=0.0), dtype, INTERPRET)
            nw = tl.load(nw_ptr + k0 + kk, mask=k_in, other=0.0).to(tl.float32)
            x = norm_rounded(total, inv[None, :], nw[:, None], dtype, INTERPRET).to(dtype)
        if INTERPRET:  # the CPU interpreter multiplies 16-bit floats as raw integers; upcast there only
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y = tl.trans(acc)
    tl.store(y_ptr + r[:, None] * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & n_ok[None, :])


MMA_WARPS = 4


def mma_launch(n: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, warps, stages) of linear_mma for N outputs: on an H100 (benchmarks/bench_gemv.py,
    16 rows) 64-column tiles won from N = 4096 (Qwen3's q/k/v 9.4 us against cuBLAS's 10.0, V2-Lite's dense
    gate/up 33.9 against 37.6) and 16-column tiles of six stages below (Qwen3's o_proj 9.3 against 10.8,
    V2-Lite's o_proj 5.6 against 6.3, its shared down 7.0 against 9.1): about a hundred programs either way."""
    if n >= 4096:
        return 64, 128, MMA_WARPS, 4
    return 16, 128, MMA_WARPS, 6


def supports_mma(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear_mma takes this call: 1..MMA_ROWS rows, 16-bit floats of one dtype, unit strides
    along K."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= MMA_ROWS and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1)


def linear_mma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               launch: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype on tensor cores, for calls
    supports_mma() takes. launch: (block_n, block_k, warps, stages) instead of mma_launch's, for
    benchmarks/bench_gemv.py."""
    if not supports_mma(x, weight):
        raise ValueError(f"linear_mma takes 1..{MMA_ROWS} rows of 16-bit features matching the weight, got x "
                         f"{tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} {weight.dtype}")
    return _launch_mma(x, weight, bias, launch)


def _launch_mma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                launch: tuple[int, int, int, int] | None, norm: tuple | None = None) -> torch.Tensor:
    """linear_mma's launch; norm = (residual, norm weight, eps, sum out): x normed first."""
    m, k = x.shape
    n = weight.shape[0]
    block_n, block_k, num_warps, num_stages = launch or mma_launch(n)
    y = empty(m, n, dtype=x.dtype, device=x.device)
    residual, norm_weight, eps, total = norm if norm is not None else (x, x, 0.0, y)
    _mma_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, y, residual, norm_weight, total, m, n, k, x.stride(0),
        weight.stride(0), y.stride(0), residual.stride(0), total.stride(0), eps,
        HAS_BIAS=bias is not None, NORM=norm is not None, EVEN_K=k % block_k == 0, INTERPRET=interpreting(),
        ROWS=MMA_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        **launch_args(x),
    )
    return y


def supports_add_norm_mma(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                          weight: torch.Tensor) -> bool:
    """Whether add_norm_linear_mma takes this call: rows linear_mma takes, their residual (same shape and
    dtype, unit stride along K) and a norm weight in x's dtype."""
    return supports_mma(x, weight) and norm_operands_fit(x, residual, norm_weight)


def add_norm_linear_mma(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                        launch: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """add_norm_linear for 1..MMA_ROWS rows on tensor cores: (linear(h, weight, bias), x + residual) with
    h = norm_rope.add_rms_norm(x, residual, norm_weight, eps)[0], in one launch."""
    if not supports_add_norm_mma(x, residual, norm_weight, weight):
        raise ValueError(f"add_norm_linear_mma takes 1..{MMA_ROWS} rows with their residual and norm weight in "
                         f"their dtype, got {norm_operands_text(x, residual, norm_weight, weight)}")
    total = empty(*x.shape, dtype=x.dtype, device=x.device)
    return _launch_mma(x, weight, bias, launch, (residual, norm_weight, eps, total)), total
