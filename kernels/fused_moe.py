"""Fused expert MLP in Triton: permute, gate/up GEMM with SiLU(gate)*up, down GEMM with the routing
weight, combine in token order. bf16 activations with fp32 accumulation; weights bf16, FP8 e4m3 with
128x128 block scales, or INT8 with per-output-channel scales.

Data flow for hidden [T, H], k slots per token, S = T*k:
1. align_block_size: slot indices sorted by expert into BLOCK_M-aligned runs (align.py); skipped on
   the per-slot decode path (MoeConfig.per_slot), where each block holds one slot.
2. up GEMM over runs: act[p] = silu(x[slot // k] @ gate.T) * (x[slot // k] @ up.T), p the padded
   position; written [max_padded, I], padding rows unwritten and never read.
3. down GEMM over runs: y[slot] = w[slot] * act[p] @ w2.T, written [S, H].
4. combine: out[t] = sum over held slots j of y[t*k + j], in fp32, in slot order (deterministic).
A program exits at once when its block lies past the used runs, so only experts with tokens have
their weights read. With MoeConfig.gemv, steps 2-4 are moe_gemv.py's GEMVs instead (decode).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

try:  # host-side TMA descriptors: Triton 3.4 and later; before, `tma` configurations load per thread
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

from . import moe_gemv
from .align import Alignment, align_block_size, counting_plan
from .configs import GemmConfig, GemvConfig, MoeConfig, get_config
from .launch import TWO_PROGRAMS_PER_SM, empty, interpreting
from .numerics import FP8_GROUP, QUANT_CODES, quantize_activations, quantize_group, store_rounded
from .pdl import enter, launch_args
from .weights import ExpertWeights


@triton.jit
def _dot(a, b, acc, SWAP_AB: tl.constexpr):
    """acc + a @ b for a [M, K], b [K, N]; with SWAP_AB, acc and the result are transposed ([N, M]):
    the weights' N becomes the tensor-core tile's M, so a block of one or a few token rows still
    fills a Hopper warpgroup instruction (64 rows) instead of a 16-row one."""
    if SWAP_AB:
        out = tl.dot(tl.trans(b), tl.trans(a), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _scale2d(row_scale, col_scale, SWAP_AB: tl.constexpr):
    """row_scale [M] times col_scale [N] as the [M, N] (or with SWAP_AB [N, M]) accumulator's factor."""
    if SWAP_AB:
        out = col_scale[:, None] * row_scale[None, :]
    else:
        out = row_scale[:, None] * col_scale[None, :]
    return out


# Token and slot counts change every call; specialising on them would recompile per batch size.
@triton.jit(do_not_specialize=["S", "E", "top_k", "max_blocks", "gate_scale_rows"])
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, b_scale_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, ids_ptr,
    a_scale_ptr, a_desc, b_desc, N, K, S, E, top_k, max_blocks, gate_scale_rows,
    stride_am, stride_be, stride_bn, stride_cm, stride_se, stride_sn, stride_sk, stride_asm,
    A_BY_TOKEN: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, QUANT: tl.constexpr,
    INTERPRET: tl.constexpr, EVEN_K: tl.constexpr, PER_SLOT: tl.constexpr, A_FP8: tl.constexpr,
    TMA_A: tl.constexpr, TMA_B: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr,
):
    """C = A @ B[e].T over one BLOCK_M run of expert e; N output columns (I when GATED: the up rows
    sit N rows below the gate rows), K the reduction length. PER_SLOT: block m is slot m alone.
    A_FP8: A is already e4m3 with one scale per row and 128-wide K group (a_scale_ptr).
    TMA_B: the weight tiles come through b_desc (B as [E * rows per expert, K], tiles [BLOCK_N,
    BLOCK_K]) by the tensor-memory accelerator instead of per-thread loads; TMA_A likewise for A when
    its rows are the block's own (the down GEMM), tiles [BLOCK_M, BLOCK_K]. Reads past K are zeros;
    A's rows past the run are padding whose products are never stored. SWAP_AB: C.T = B[e] @ A.T is
    accumulated instead (see _dot), and transposed back for the epilogue."""
    enter(PDL)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(max_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    if PER_SLOT:
        # Decode without the permutation: one slot per block (row 0), intermediates indexed by slot.
        # A token's experts are distinct, so at one token every expert's weights are read once.
        e_id = tl.load(ids_ptr + pid_m)
        if (e_id < 0) | (e_id >= E):
            return
        expert = e_id.to(tl.int64)
        slot = pid_m + tl.zeros([BLOCK_M], dtype=tl.int32)
        row_ok = tl.arange(0, BLOCK_M) == 0
        offs_p = slot
    else:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_ptr + offs_p)
        row_ok = slot < S
    if A_BY_TOKEN:
        a_rows = (slot // top_k).to(tl.int64)
    else:
        a_rows = offs_p.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    up_shift = N * stride_bn
    if QUANT == 1:
        s_base = b_scale_ptr + expert * stride_se
        gate_srow = offs_n // 128
        up_srow = gate_scale_rows + offs_n // 128
    if TMA_B:  # TMA coordinates are int32: E * rows per expert stays far below 2**31
        b_row = expert.to(tl.int32) * (stride_be // stride_bn).to(tl.int32) + pid_n * BLOCK_N
    if TMA_A:
        a_row = pid_m * BLOCK_M

    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros_like(acc)
    for k0 in range(0, K, BLOCK_K):
        if TMA_A:
            a = a_desc.load([a_row, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
        if TMA_B:
            b = b_desc.load([b_row, k0]).T
            if GATED:
                bu = b_desc.load([b_row + N, k0]).T
        elif EVEN_K:
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            if GATED:
                bu = tl.load(b_ptrs + up_shift, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if GATED:
                bu = tl.load(b_ptrs + up_shift, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if QUANT == 1:
            kb = k0 // 128
            if A_FP8:
                aq = a
                a_scale = tl.load(a_scale_ptr + a_rows * stride_asm + kb, mask=row_ok, other=0.0)
            else:
                # One scale per row and 128-wide K group (BLOCK_K == 128), quantised here: cheap
                # next to the weight stream when few rows share each weight tile.
                aq, a_scale = quantize_group(a, INTERPRET)
            bs = tl.load(s_base + gate_srow * stride_sn + kb * stride_sk, mask=n_ok, other=0.0)
            acc += _dot(aq, b, None, SWAP_AB) * _scale2d(a_scale, bs, SWAP_AB)
            if GATED:
                bus = tl.load(s_base + up_srow * stride_sn + kb * stride_sk, mask=n_ok, other=0.0)
                acc_up += _dot(aq, bu, None, SWAP_AB) * _scale2d(a_scale, bus, SWAP_AB)
        else:
            if QUANT == 2:  # int8 values are exact in bf16 (the interpreter's int8->bf16 is broken)
                b = b.to(tl.float32 if INTERPRET else a.dtype)
                if GATED:
                    bu = bu.to(tl.float32 if INTERPRET else a.dtype)
            if INTERPRET:  # the CPU interpreter multiplies bf16 as raw integers; upcast there only
                a = a.to(tl.float32)
                b = b.to(tl.float32)
                if GATED:
                    bu = bu.to(tl.float32)
            acc = _dot(a, b, acc, SWAP_AB)
            if GATED:
                acc_up = _dot(a, bu, acc_up, SWAP_AB)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if SWAP_AB:
        acc = tl.trans(acc)
        if GATED:
            acc_up = tl.trans(acc_up)
    if QUANT == 2:  # per-output-channel scales
        s_base = b_scale_ptr + expert * stride_se
        acc *= tl.load(s_base + offs_n * stride_sn, mask=n_ok, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(s_base + (N + offs_n) * stride_sn, mask=n_ok, other=0.0)[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        c_rows = offs_p.to(tl.int64)
    else:
        c_rows = slot.to(tl.int64)
    if MUL_WEIGHT:
        acc *= tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :]
    store_rounded(c_ptrs, acc, row_ok[:, None] & n_ok[None, :], INTERPRET)


@triton.jit(do_not_specialize=["E"])
def _combine_kernel(y_ptr, ids_ptr, out_ptr, H, E, stride_y, stride_o,
                    K: tl.constexpr, BLOCK_H: tl.constexpr, SELECT: tl.constexpr, INTERPRET: tl.constexpr,
                    PDL: tl.constexpr):
    """out[t] = sum of y[t*K + j] over the slots j whose expert is held here, in slot order. SELECT: every
    slot's row is read and a slot of an expert held elsewhere (never written) dropped by a select, so no
    row load waits for its slot's id (small steps, bound by those trips); else such rows are masked off
    and not read (large steps, bound by bandwidth)."""
    enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(ids_ptr + t * K + j)
        held = (e >= 0) & (e < E)
        row = y_ptr + (t * K + j) * stride_y + offs
        if SELECT:
            acc += tl.where(held, tl.load(row, mask=h_ok, other=0.0).to(tl.float32), 0.0)
        else:
            acc += tl.load(row, mask=offs < tl.where(held, H, 0), other=0.0).to(tl.float32)
    store_rounded(out_ptr + t * stride_o + offs, acc, h_ok, INTERPRET)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@dataclass(frozen=True)
class SlotPlan:
    """How the GEMMs walk the T*k slots of one call: BLOCK_M-aligned runs per expert (`runs`), or,
    when `runs` is None, one slot per block with no permutation (the decode path)."""

    ids: torch.Tensor  # [S] flat expert ids, int64
    top_k: int
    num_experts: int
    block_m: int
    runs: Alignment | None

    @property
    def num_blocks(self) -> int:
        return self.ids.numel() if self.runs is None else self.runs.block_expert.numel()

    @property
    def act_rows(self) -> int:
        """Rows of the intermediate buffer: padded positions, or slots on the decode path."""
        return self.ids.numel() if self.runs is None else self.runs.sorted_ids.numel()


def plan_slots(topk_ids: torch.Tensor, num_experts: int, config: MoeConfig) -> SlotPlan:
    """Step 1 (or nothing, on the per-slot path): the walk of both GEMMs for topk_ids [T, k]."""
    runs = None if config.per_slot else align_block_size(topk_ids, num_experts, config.block_m)
    return SlotPlan(topk_ids.reshape(-1), topk_ids.shape[1], num_experts, config.block_m, runs)


def _descriptor(t: torch.Tensor | None, rows: int, cols: int, wanted: bool):
    """A TMA descriptor of 2-D t in [rows, cols] tiles, or None when not wanted or not possible
    (the accelerator needs 16-byte aligned base and row stride and a contiguous last dimension);
    the kernel then loads the same tiles per thread."""
    if not wanted or TensorDescriptor is None or t is None or t.dim() != 2 or t.stride(1) != 1:
        return None
    if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        return None
    return TensorDescriptor.from_tensor(t, [rows, cols])


_FITTED_STAGES: dict = {}  # (GemmConfig, block_m, A dtype, B dtype) -> stages that fit in shared memory


def _gemm(a, b, c, scale, topk_w, plan: SlotPlan, n, k, gate_scale_rows, cfg: GemmConfig, *,
          a_by_token: bool, gated: bool, mul_weight: bool, quant: str, a_scale: torch.Tensor | None = None):
    if quant == "fp8" and cfg.block_k != FP8_GROUP:
        cfg = dataclasses.replace(cfg, block_k=FP8_GROUP)
    max_blocks = plan.num_blocks
    grid = (max_blocks * triton.cdiv(n, cfg.block_n),)
    if scale is None:
        scale, strides = b, (0, 0, 0)
    else:
        strides = tuple(scale.stride()) + (0,) * (3 - scale.dim())
    runs = plan.runs
    sorted_ids, block_expert, num_padded = (plan.ids,) * 3 if runs is None else (
        runs.sorted_ids, runs.block_expert, runs.num_padded)
    b_desc = _descriptor(b.view(-1, b.shape[-1]) if b.is_contiguous() else None, cfg.block_n, cfg.block_k, cfg.tma)
    # A's rows can be a tile only where a block's rows are its own padded positions (the down GEMM).
    a_desc = _descriptor(a, plan.block_m, cfg.block_k, cfg.tma and not a_by_token and runs is not None)

    def launch(stages: int) -> None:
        _moe_gemm_kernel[grid](
            a, b, c, scale, topk_w, sorted_ids, block_expert, num_padded, plan.ids,
            a if a_scale is None else a_scale, a_desc or a, b_desc or b,
            n, k, plan.ids.numel(), plan.num_experts, plan.top_k, max_blocks,
            gate_scale_rows, a.stride(0), b.stride(0), b.stride(1), c.stride(0), *strides,
            0 if a_scale is None else a_scale.stride(0),
            A_BY_TOKEN=a_by_token, GATED=gated, MUL_WEIGHT=mul_weight, QUANT=QUANT_CODES[quant],
            INTERPRET=interpreting(), EVEN_K=k % cfg.block_k == 0, PER_SLOT=runs is None, A_FP8=a_scale is not None,
            TMA_A=a_desc is not None, TMA_B=b_desc is not None, SWAP_AB=cfg.swap_ab,
            BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=stages, **launch_args(a),
        )

    # The tables' stages are sized for 2-byte operands; float32 ones (tests, a float32 model on a GPU) can need more
    # shared memory than the GPU has: fewer stages then, remembered per configuration and dtype.
    key = (cfg, plan.block_m, a.dtype, b.dtype)
    stages = _FITTED_STAGES.get(key, cfg.num_stages)
    while True:
        try:
            launch(stages)
            return
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            _FITTED_STAGES[key] = stages


def gate_up(hidden: torch.Tensor, weights: ExpertWeights, plan: SlotPlan, cfg: GemmConfig,
            prequant: bool = False) -> torch.Tensor:
    """Step 2: act [plan.act_rows, I] = silu(x @ gate.T) * (x @ up.T) per held row (others unwritten).
    prequant (FP8 only): quantise x once here instead of in every program of the GEMM."""
    inter = weights.intermediate_size
    act = empty(plan.act_rows, inter, dtype=hidden.dtype, device=hidden.device)
    a, a_scale = quantize_activations(hidden) if prequant and weights.quant == "fp8" else (hidden, None)
    _gemm(a, weights.w13, act, weights.w13_scale, hidden, plan, inter, weights.hidden_size,
          triton.cdiv(inter, FP8_GROUP), cfg, a_by_token=True, gated=True, mul_weight=False, quant=weights.quant,
          a_scale=a_scale)
    return act


def down(act: torch.Tensor, weights: ExpertWeights, plan: SlotPlan, topk_w: torch.Tensor,
         cfg: GemmConfig, prequant: bool = False) -> torch.Tensor:
    """Step 3: y [T*k, H], each held slot's expert output times its routing weight (float32 topk_w)."""
    h = weights.hidden_size
    y = empty(plan.ids.numel(), h, dtype=act.dtype, device=act.device)
    a, a_scale = quantize_activations(act) if prequant and weights.quant == "fp8" else (act, None)
    _gemm(a, weights.w2, y, weights.w2_scale, topk_w, plan, h, weights.intermediate_size, 0, cfg,
          a_by_token=False, gated=False, mul_weight=True, quant=weights.quant, a_scale=a_scale)
    return y


def combine(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Step 4: out [T, H] = sum over held slots of y, in slot order (a slot whose expert lies outside
    [0, num_experts) belongs to another group's experts: skipped). On an H100 (benchmarks/bench_combine.py,
    hidden 2048): 1.5 us at 16 tokens as 256-column programs reading every row, 1.9-2.0 us at 64 and
    51 us at 4096 tokens of top-8 (the bandwidth limit: 50 us) as 1024-column programs of 8 warps."""
    t, top_k = topk_ids.shape
    h = y.shape[1]
    out = empty(t, h, dtype=dtype, device=y.device)
    small = t * triton.cdiv(h, 256) <= TWO_PROGRAMS_PER_SM  # 256-column programs, rows read by select
    block_h = min(256 if small else 1024, triton.next_power_of_2(h))
    _combine_kernel[(t, triton.cdiv(h, block_h))](
        y, topk_ids, out, h, num_experts, y.stride(0), out.stride(0),
        K=top_k, BLOCK_H=block_h, SELECT=small, INTERPRET=interpreting(), num_warps=4 if small else 8,
        **launch_args(y),
    )
    return out


def uses_gemv(cfg: MoeConfig, weights: ExpertWeights) -> bool:
    """Whether a call of this configuration runs as the expert GEMVs (else the tensor-core GEMMs)."""
    return cfg.gemv is not None and moe_gemv.supports(weights)


def gemv_down(act: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_w: torch.Tensor,
              cfg: GemvConfig) -> torch.Tensor:
    """Steps 3 and 4 on the GEMV path (MoeConfig.gemv): out [T, H] from act [T*k, I] and float32 topk_w."""
    y = moe_gemv.down(act, weights, topk_ids.view(-1), topk_w.view(-1), topk_ids.shape[1], cfg)
    return y if cfg.combine else combine(y, topk_ids, weights.num_experts, act.dtype)


def select_config(hidden: torch.Tensor, weights: ExpertWeights, top_k: int) -> MoeConfig:
    """The table's (or the default) configuration for this call's shape, GPU and token count."""
    t, h = hidden.shape
    return get_config(_device_name(hidden.device), t, weights.num_experts, h, weights.intermediate_size,
                      top_k, weights.quant)


def fused_experts(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """Routed-expert output [T, H] in hidden's dtype; the semantics of reference.fused_experts."""
    t, h = hidden.shape
    if weights.hidden_size != h:
        raise ValueError(f"hidden has {h} features but the experts take {weights.hidden_size}")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    topk_ids = topk_ids.contiguous()
    topk_w = topk_weights.to(torch.float32).contiguous()
    if t == 0:
        return empty(0, h, dtype=hidden.dtype, device=hidden.device)
    cfg = config or select_config(hidden, weights, topk_ids.shape[1])
    if uses_gemv(cfg, weights):
        act = moe_gemv.gate_up(hidden, weights, topk_ids.view(-1), topk_ids.shape[1], cfg.gemv)
        return gemv_down(act, weights, topk_ids, topk_w, cfg.gemv)
    plan = plan_slots(topk_ids, weights.num_experts, cfg)
    act = gate_up(hidden, weights, plan, cfg.up, cfg.prequant)
    y = down(act, weights, plan, topk_w, cfg.down, cfg.prequant)
    return combine(y, topk_ids, weights.num_experts, hidden.dtype)


def launch_signature(num_tokens: int, weights: ExpertWeights, top_k: int, device: torch.device) -> tuple:
    """What decides which compiled kernels a call of `num_tokens` tokens launches: its configuration
    and the alignment's constexprs (align.counting_plan: one fused launch, or the number of counting
    chunks rounded up to a power of two). Two calls of one signature run the same compiled kernels."""
    cfg = get_config(_device_name(device), num_tokens, weights.num_experts, weights.hidden_size,
                     weights.intermediate_size, top_k, weights.quant)
    fused, chunks = counting_plan(num_tokens * top_k)
    return cfg, fused, triton.next_power_of_2(chunks)


def warm_up(weights: ExpertWeights, top_k: int, max_tokens: int, dtype: torch.dtype) -> list[int]:
    """One call for each distinct launch signature of 1..max_tokens tokens (at its smallest token
    count), so that Triton compiles at start-up what serving would otherwise compile in the middle
    of a step: on an H200 a step that met a new prefill size took 0.5-1 s instead of ~0.1 s. Compiled
    kernels are cached on disk, so later start-ups only load them. Returns the token counts run."""
    device = weights.w13.device
    first: dict[tuple, int] = {}
    for t in range(1, max_tokens + 1):
        first.setdefault(launch_signature(t, weights, top_k, device), t)
    counts = sorted(first.values())
    for t in counts:
        hidden = torch.zeros(t, weights.hidden_size, dtype=dtype, device=device)
        ids = (torch.arange(t * top_k, device=device) % weights.num_experts).view(t, top_k)
        fused_experts(hidden, weights, ids, torch.full((t, top_k), 1.0 / top_k, device=device))
    return counts
