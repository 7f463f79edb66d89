"""Triton gating kernels: the router's logits at decode sizes, softmax top-k and group-limited
(DeepSeek-V2/V3) top-k, one launch per call.

Each top-k program takes BLOCK_T tokens and the whole expert row (E <= a few hundred), so any token
count is one launch. Top-k is k rounds of argmax-and-mask in registers; k is small (2..8) in every
model we serve, and equals E at most. At decode sizes a program takes one token with one warp per
128 experts, so the k rounds of reductions stay within warps (on an H200 a Qwen3 top-8 over one
token took 6.2 us with 16-token blocks of four warps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty, interpreting
from .numerics import add_rounded, norm_operands_fit, norm_operands_text, norm_rounded
from .pdl import enter, launch_args
from .ops import ROUTER_GEMV_MAX_HIDDEN, ROUTER_GEMV_MAX_TOKENS

ONE_TOKEN_BLOCKS_MAX = 64  # token counts up to this get one program (and few warps) per token


def topk_launch(t: int, block_e: int) -> tuple[int, int]:
    """(tokens per program, warps) of a top-k launch."""
    if t <= ONE_TOKEN_BLOCKS_MAX:
        return 1, max(1, min(4, block_e // 128))
    return max(1, min(16, 4096 // block_e)), 4


@triton.jit(do_not_specialize=["T"])
def _router_logits_kernel(x_ptr, w_ptr, out_ptr, r_ptr, nw_ptr, h_ptr, sum_ptr, T, E, H, stride_x, stride_w,
                          stride_o, stride_r, stride_h, eps,
                          BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, TOKENS: tl.constexpr, NORM: tl.constexpr,
                          INTERPRET: tl.constexpr, PDL: tl.constexpr):
    """out[t, e] = sum over h of x[t, h] * w[e, h] in float32, for BLOCK_E experts and TOKENS tokens a
    program. The program holds its experts' whole weight rows, read before the PDL wait: nothing in a
    step writes them (pdl.py), so their stream overlaps the kernel before. NORM: x is first replaced by
    RMSNorm(x + r) * nw, rounded as norm_rope.add_rms_norm rounds (numerics.add_rounded, norm_rounded); the
    programs of the first expert block store the normed rows at h_ptr and the sums at sum_ptr (stride_h
    both)."""
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ts = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)
    hs = tl.arange(0, BLOCK_H)
    e_ok = es < E
    t_ok = ts < T
    h_ok = hs < H
    w = tl.load(w_ptr + es[:, None].to(tl.int64) * stride_w + hs[None, :], mask=e_ok[:, None] & h_ok[None, :],
                other=0.0).to(tl.float32)
    if NORM:
        nw = tl.load(nw_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    enter(PDL)
    ok = t_ok[:, None] & h_ok[None, :]
    x = tl.load(x_ptr + ts[:, None].to(tl.int64) * stride_x + hs[None, :], mask=ok, other=0.0)
    if NORM:
        dtype = x_ptr.dtype.element_ty
        total = add_rounded(x, tl.load(r_ptr + ts[:, None].to(tl.int64) * stride_r + hs[None, :], mask=ok, other=0.0),
                            dtype, INTERPRET)
        inv = 1.0 / tl.sqrt(tl.sum(total * total, axis=1) / H + eps)
        normed = norm_rounded(total, inv[:, None], nw[None, :], dtype, INTERPRET)
        first = tl.where(tl.program_id(0) == 0, ok, False)
        rows = ts[:, None].to(tl.int64) * stride_h + hs[None, :]
        tl.store(sum_ptr + rows, total.to(dtype), mask=first)
        tl.store(h_ptr + rows, normed.to(dtype), mask=first)
        x = normed
    acc = tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    tl.store(out_ptr + ts[:, None] * stride_o + es[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])


def _router_launch(e: int, h: int) -> tuple[int, int, int, int]:
    """(experts per program, padded hidden, tokens per program, warps): about 128 programs per block of
    tokens, each holding its experts' whole weight rows (at most 16K float32 values a program) and up
    to 4 tokens' products (8K values). The same at every T, so a row's logits do not depend on it."""
    block_h = triton.next_power_of_2(h)
    block_e = max(1, min(triton.next_power_of_2(e) // 128, ROUTER_GEMV_MAX_HIDDEN // block_h))
    tokens = max(1, min(4, 8192 // (block_e * block_h)))
    return block_e, block_h, tokens, 4 if block_e * block_h <= 8192 else 8


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gate logits x [T, H] @ weight [E, H]^T in float32 for T <= ROUTER_GEMV_MAX_TOKENS, in one
    launch (about 128 programs per 4 tokens), x read in its own dtype: the float32 GEMM it replaces was
    three launches at one token (a cast of x, a GEMV and its reduction)."""
    t, h = x.shape
    if not 1 <= t <= ROUTER_GEMV_MAX_TOKENS:
        raise ValueError(f"router_logits takes 1..{ROUTER_GEMV_MAX_TOKENS} tokens, got {t}")
    if weight.shape[1] != h:
        raise ValueError(f"the router weight has {weight.shape[1]} columns but x has {h} features")
    if h > ROUTER_GEMV_MAX_HIDDEN:
        raise ValueError(f"router_logits holds whole weight rows of at most {ROUTER_GEMV_MAX_HIDDEN} features, "
                         f"got {h}")
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    return _launch_router(x, weight)


def _launch_router(x: torch.Tensor, weight: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
    """router_logits' launch; norm = (residual, norm weight, eps, normed out, sum out): x normed first."""
    t, h = x.shape
    e = weight.shape[0]
    out = empty(t, e, dtype=torch.float32, device=x.device)
    block_e, block_h, tokens, warps = _router_launch(e, h)
    residual, norm_weight, eps, normed, total = norm if norm is not None else (x, x, 0.0, x, x)
    _router_logits_kernel[(triton.cdiv(e, block_e), triton.cdiv(t, tokens))](
        x, weight, out, residual, norm_weight, normed, total, t, e, h, x.stride(0), weight.stride(0), out.stride(0),
        residual.stride(0), normed.stride(0), eps,
        BLOCK_E=block_e, BLOCK_H=block_h, TOKENS=tokens, NORM=norm is not None, INTERPRET=interpreting(),
        num_warps=warps, **launch_args(x),
    )
    return out


def supports_add_norm_router(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                             weight: torch.Tensor) -> bool:
    """Whether add_norm_router_logits takes this call: decode-size 16-bit rows router_logits takes, with their
    residual (same shape and dtype) and a norm weight in their dtype, all unit-strided along the hidden size."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= ROUTER_GEMV_MAX_TOKENS and x.shape[1] <= ROUTER_GEMV_MAX_HIDDEN
            and x.dtype in (torch.bfloat16, torch.float16) and x.stride(1) == 1
            and norm_operands_fit(x, residual, norm_weight)
            and weight.dim() == 2 and weight.shape[1] == x.shape[1] and weight.stride(1) == 1)


def add_norm_router_logits(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, x + residual, router_logits(h, weight)) with h = norm_rope.add_rms_norm(x, residual, norm_weight,
    eps)[0], in one launch: a decoder's add, its post-attention norm and the router's logits."""
    if not supports_add_norm_router(x, residual, norm_weight, weight):
        raise ValueError(f"add_norm_router_logits takes 1..{ROUTER_GEMV_MAX_TOKENS} 16-bit rows of at most "
                         f"{ROUTER_GEMV_MAX_HIDDEN} features with their residual and norm weight in their dtype, got "
                         f"{norm_operands_text(x, residual, norm_weight, weight)}")
    normed = empty(*x.shape, dtype=x.dtype, device=x.device)
    total = empty(*x.shape, dtype=x.dtype, device=x.device)
    logits = _launch_router(x, weight, (residual, norm_weight, eps, normed, total))
    return normed, total, logits


@triton.jit(do_not_specialize=["T"])
def _router_gemm_kernel(x_ptr, w_ptr, out_ptr, T, E, H, stride_x, stride_w, stride_o,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
                        PDL: tl.constexpr):
    """out[t, e] = sum over h of x[t, h] * w[e, h] in float32 for bf16 x and float32 w, on tensor cores:
    each float32 weight is the exact sum of three bf16 values (its leading 8 significant bits, the next
    8, the last 8), so x times each is an exact product and the three bf16 dots, accumulated in float32,
    give the float32 GEMM's value up to the order of its additions. A row's logits depend on its own
    values only (the K steps in a fixed order), not on how many rows the call has."""
    enter(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    r_ok = rows < T
    e_ok = es < E
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :], mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + es[:, None].to(tl.int64) * stride_w + ks[None, :], mask=e_ok[:, None] & k_ok[None, :],
                    other=0.0)
        hi = w.to(tl.bfloat16)
        rest = w - hi.to(tl.float32)  # exact: w and hi agree in their leading bits
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)  # exact again, and at most 8 significant bits
        if INTERPRET:  # the interpreter's dot misreads bf16 values converted in registers: the same exact
            xf = x.to(tl.float32)  # products from their float32 forms
            acc = tl.dot(xf, tl.trans(lo.to(tl.float32)), acc, input_precision="ieee")
            acc = tl.dot(xf, tl.trans(mid.to(tl.float32)), acc, input_precision="ieee")
            acc = tl.dot(xf, tl.trans(hi.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(lo), acc)
            acc = tl.dot(x, tl.trans(mid), acc)
            acc = tl.dot(x, tl.trans(hi), acc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + es[None, :], acc, mask=r_ok[:, None] & e_ok[None, :])


ROUTER_GEMM_BLOCK_M = 64
ROUTER_GEMM_BLOCK_K = 128


def router_logits_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gate logits x [T, H] (bf16) @ weight [E, H]^T (float32) in float32 at prompt sizes, one launch:
    against a cast of x to float32 and a float32 GEMM off the tensor cores, 41 against 88 us at 4096 tokens
    and 81 against 152 at 8192 (H100, 128 experts, hidden 2048; benchmarks/bench_router.py)."""
    t, h = x.shape
    e = weight.shape[0]
    if x.dtype != torch.bfloat16 or weight.dtype != torch.float32:
        raise ValueError(f"router_logits_gemm takes bf16 activations and a float32 weight, got {x.dtype} and "
                         f"{weight.dtype}")
    if weight.shape[1] != h:
        raise ValueError(f"the router weight has {weight.shape[1]} columns but x has {h} features")
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    out = empty(t, e, dtype=torch.float32, device=x.device)
    if t == 0:
        return out
    block_e = max(16, min(64, triton.next_power_of_2(e)))
    _router_gemm_kernel[(triton.cdiv(t, ROUTER_GEMM_BLOCK_M), triton.cdiv(e, block_e))](
        x, weight, out, t, e, h, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=ROUTER_GEMM_BLOCK_M, BLOCK_E=block_e, BLOCK_K=ROUTER_GEMM_BLOCK_K, INTERPRET=interpreting(),
        num_warps=4, num_stages=3,
        **launch_args(x),
    )
    return out


@triton.jit(do_not_specialize=["T"])
def _softmax_topk_kernel(
    logits_ptr, weights_ptr, ids_ptr, T, E, stride_t,
    K: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    enter(PDL)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    # Rows past T repeat the last row so they compute quietly; they are never stored.
    src = tl.minimum(rows, T - 1).to(tl.int64)
    x = tl.load(logits_ptr + src[:, None] * stride_t + cols[None, :], mask=col_ok[None, :], other=float("-inf"))
    x = x.to(tl.float32)
    x = x - tl.max(x, axis=1)[:, None]
    p = tl.where(col_ok[None, :], tl.exp(x), 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    # Padding columns get -2 so they are never chosen, even when k == E.
    work = tl.where(ok, p, -2.0)
    kcols = tl.arange(0, BLOCK_K)
    out_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    out_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(work, axis=1)
        val = tl.max(work, axis=1)
        out_w = tl.where(kcols[None, :] == j, val[:, None], out_w)
        out_i = tl.where(kcols[None, :] == j, best[:, None], out_i)
        work = tl.where(cols[None, :] == best[:, None], -3.0, work)
    if RENORM:
        out_w = out_w / tl.sum(out_w, axis=1)[:, None]
    dst = rows[:, None] * K + kcols[None, :]
    kmask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + dst, out_w, mask=kmask)
    tl.store(ids_ptr + dst, out_i.to(tl.int64), mask=kmask)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool,
                 launch: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts then top-k, sorted descending: (weights [T, k] float32, ids [T, k] int64).
    launch: (tokens per program, warps) instead of topk_launch's, for benchmarks/bench_router.py."""
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"top-k must be in [1, {e}] (the number of experts), got {k}")
    logits = logits.contiguous()
    weights = empty(t, k, dtype=torch.float32, device=logits.device)
    ids = empty(t, k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    block_e = triton.next_power_of_2(e)
    block_t, warps = launch or topk_launch(t, block_e)
    _softmax_topk_kernel[(triton.cdiv(t, block_t),)](
        logits, weights, ids, t, e, logits.stride(0),
        K=k, RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(k),
        num_warps=warps, **launch_args(logits),
    )
    return weights, ids


@triton.jit(do_not_specialize=["T"])
def _grouped_topk_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, E, stride_t, scaling,
    K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    enter(PDL)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    # Rows past T repeat the last row so they compute quietly; they are never stored.
    src = tl.minimum(rows, T - 1).to(tl.int64)
    x = tl.load(logits_ptr + src[:, None] * stride_t + cols[None, :], mask=col_ok[None, :], other=float("-inf"))
    x = x.to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        m = tl.max(x, axis=1)
        p = tl.where(col_ok[None, :], tl.exp(x - m[:, None]), 0.0)
        scores = p / tl.sum(p, axis=1)[:, None]
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        choice = scores + b[None, :]
    else:
        choice = scores
    NEG: tl.constexpr = float("-inf")
    choice = tl.where(ok, choice, NEG)
    group_of = cols // GROUP_SIZE
    gcols = tl.arange(0, BLOCK_G)
    # Group scores: sum of the two best (biased) scores with a bias (V3), else the best (V2).
    gscore = tl.full([BLOCK_T, BLOCK_G], NEG, tl.float32)
    for g in tl.static_range(N_GROUP):
        in_g = (group_of == g)[None, :]
        vals = tl.where(in_g, choice, NEG)
        top1 = tl.max(vals, axis=1)
        if HAS_BIAS:
            n_top = tl.sum(tl.where(in_g & (vals == top1[:, None]), 1, 0), axis=1)
            below = tl.max(tl.where(vals < top1[:, None], vals, NEG), axis=1)
            s = top1 + tl.where(n_top >= 2, top1, below)
        else:
            s = top1
        gscore = tl.where(gcols[None, :] == g, s[:, None], gscore)
    # Keep the TOPK_GROUP best groups.
    gsel = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int32)
    gwork = gscore
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.argmax(gwork, axis=1)
        gsel = tl.where(gcols[None, :] == best[:, None], 1, gsel)
        gwork = tl.where(gcols[None, :] == best[:, None], NEG, gwork)
    eligible = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for g in tl.static_range(N_GROUP):
        sel_g = tl.sum(tl.where(gcols[None, :] == g, gsel, 0), axis=1)
        eligible = tl.where((group_of == g)[None, :] & (sel_g[:, None] > 0), 1, eligible)
    work = tl.where(eligible > 0, choice, NEG)
    kcols = tl.arange(0, BLOCK_K)
    out_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    out_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(work, axis=1)
        hit = cols[None, :] == best[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        out_w = tl.where(kcols[None, :] == j, w[:, None], out_w)
        out_i = tl.where(kcols[None, :] == j, best[:, None], out_i)
        work = tl.where(hit, NEG, work)
    if RENORM:
        out_w = out_w * (scaling / (tl.sum(out_w, axis=1) + 1e-20))[:, None]
    else:
        out_w = out_w * scaling
    dst = rows[:, None] * K + kcols[None, :]
    kmask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + dst, out_w, mask=kmask)
    tl.store(ids_ptr + dst, out_i.to(tl.int64), mask=kmask)


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
    """Group-limited top-k with the semantics of reference.grouped_topk (ids in descending choice order)."""
    t, e = logits.shape
    if scoring not in ("sigmoid", "softmax"):
        raise ValueError(f"unknown scoring function {scoring!r}; expected 'sigmoid' or 'softmax'")
    if n_group < 1 or e % n_group:
        raise ValueError(f"n_group must divide the number of experts ({e}), got {n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if not 1 <= k <= topk_group * (e // n_group):
        raise ValueError(f"top-k must be in [1, {topk_group * (e // n_group)}] (experts in the kept groups), got {k}")
    if correction_bias is not None and e // n_group < 2:
        raise ValueError("a correction bias ranks groups by their two best experts: groups need >= 2 experts")
    logits = logits.contiguous()
    weights = empty(t, k, dtype=torch.float32, device=logits.device)
    ids = empty(t, k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    block_e = triton.next_power_of_2(e)
    block_t, warps = topk_launch(t, block_e)
    bias = correction_bias.contiguous() if correction_bias is not None else logits
    _grouped_topk_kernel[(triton.cdiv(t, block_t),)](
        logits, bias, weights, ids, t, e, logits.stride(0), float(routed_scaling_factor),
        K=k, N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_SIZE=e // n_group,
        SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None, RENORM=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_K=triton.next_power_of_2(k), num_warps=warps, **launch_args(logits),
    )
    return weights, ids
