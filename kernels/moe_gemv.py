"""Expert GEMVs for decode-size calls (one token, or a few): the fused expert MLP without tensor cores.

At one token each of the k experts sees one row, so the tensor-core GEMMs of fused_moe.py use one
row of their tile, and a call is bounded by how fast its programs stream the weights. On an H200 a
one-token Qwen3-30B-A3B call took 26.0 us in bf16 and 22.3 us in FP8 against 17.8 and 8.9 us of
HBM time: FP8 paid two activation-quantisation launches and the GEMMs' ramps, which halving the
bytes does not shorten. Here, as in gemv.py, every program holds whole weight rows in registers
and reduces them with float32 multiply-adds:

1. gate_up: grid (slots, I / UP_ROWS). A program reads its slot's expert, its UP_ROWS gate and up
   rows and the token's row, and writes act[slot] = silu(gate) * up for those columns.
2. down: grid (slots, H / DOWN_ROWS), writing y[slot] = w[slot] * act[slot] @ w2[e].T, summed per
   token by fused_moe.combine; or, with GemvConfig.combine, grid (tokens, H / DOWN_ROWS): a program
   takes the token's k slots at once and writes the combined row, one launch fewer. Its reduction
   (I) may run in up to three power-of-two pieces (GemvConfig.down_pieces) rather than padded.

The down programs read the expert ids, routing weights and down rows *before* their programmatic-
dependent-launch wait (pdl.py), so that weight stream overlaps the gate/up kernel's tail. That is
safe because ids and weights come from the gating, two or more launches back: the kernels in between
(the gate/up GEMV, and an activation-quantisation launch with prequant) wait before they let the next
one launch (pdl.py). The activations, written by the kernel just before, are read after the wait.

FP8 (e4m3, 128x128 block scales): each program quantises its activation row per 128-wide group
itself (DeepSeek-V3 act_quant, as fused_moe's GEMMs do), or, with GemvConfig.up_prequant /
down_prequant, one launch quantises the rows before the GEMV; the activation and weight scales are
folded into the activation vector (_fp8_operand), so the weights are only widened.
INT8: per-output-channel scales. A row's result does not depend on the call's other rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import GemvConfig
from .launch import empty, interpreting
from .numerics import FP8_GROUP, QUANT_CODES, quantize_activations, quantize_group, round_as, store_rounded
from .pdl import enter, launch_args
from .weights import ExpertWeights

MAX_K = 16384  # reduction length a program holds in registers (H for gate/up, I for down)


@triton.jit
def _fp8_groups(x, KP: tl.constexpr, INTERPRET: tl.constexpr):
    """Activations x [R, KP] float32 quantised per 128-wide group (act_quant): the e4m3 values as
    float32 [R * KP // 128, 128] and each group's scale [R * KP // 128]."""
    R: tl.constexpr = x.shape[0]
    q, s = quantize_group(tl.reshape(x, [R * (KP // 128), 128]), INTERPRET)
    return q.to(tl.float32), s


@triton.jit
def _fp8_operand(q, s, w_scale, KP: tl.constexpr):
    """The float32 [R, KP] that e4m3 weight rows are dotted with: the groups q of _fp8_groups times
    their scales s and the weights' block scales w_scale [R, KP // 128]. A program's rows lie in one
    128-row scale block, so one weight scale per group covers all of them and the weights are only
    widened, never scaled."""
    R: tl.constexpr = w_scale.shape[0]
    return tl.reshape(q * (s * tl.reshape(w_scale, [R * (KP // 128)]))[:, None], [R, KP])


@triton.jit(do_not_specialize=["E", "gate_scale_rows"])
def _gemv_up_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, ids_ptr, act_ptr, I, K, E, gate_scale_rows,
                    stride_x, stride_xs, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_act,
                    TOP_K: tl.constexpr, QUANT: tl.constexpr, PREQUANT: tl.constexpr, INTERPRET: tl.constexpr,
                    ROWS: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr):
    """act[slot, n] = silu(x[slot // TOP_K] . gate[e, n]) * (x[slot // TOP_K] . up[e, n]) for ROWS columns.
    PREQUANT (FP8): x is already e4m3, with its group scales at xs_ptr. A slot whose expert is not held
    here reads nothing and writes nothing: masks, not an early return. On an H200 the early return
    cost 0.4 us of a one-token FP8 call and a run-time top-k's division 0.7 (copies of this kernel with
    and without each on branch experiment/gemv-variants; docs/benchmarks.md, thirteenth session)."""
    slot = tl.program_id(0)
    n = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    k = tl.arange(0, KP)
    k_ok = k < K
    token = (slot // TOP_K).to(tl.int64)
    enter(PDL)  # the ids are the gating's output, the kernel just before
    e = tl.load(ids_ptr + slot)
    held = (e >= 0) & (e < E)
    n_ok = tl.where(held, n < I, False)  # not (n < I) & held: the CPU interpreter rejects that mask
    e64 = tl.where(held, e, 0).to(tl.int64)
    w_rows = w_ptr + e64 * stride_we + k[None, :]
    mask = n_ok[:, None] & k_ok[None, :]
    wg = tl.load(w_rows + n[:, None].to(tl.int64) * stride_wn, mask=mask, other=0.0, eviction_policy="evict_first")
    wu = tl.load(w_rows + (n + I)[:, None].to(tl.int64) * stride_wn, mask=mask, other=0.0,
                 eviction_policy="evict_first")
    x = tl.load(x_ptr + token * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    xg = x
    xu = x
    if QUANT == 1:
        grp = tl.arange(0, KP // 128)
        s_row = s_ptr + e64 * stride_se + grp * stride_sk
        s_ok = tl.where(held, grp < tl.cdiv(K, 128), False)
        block = tl.program_id(1) * ROWS // 128
        sg = tl.load(s_row + block * stride_sn, mask=s_ok, other=0.0)
        su = tl.load(s_row + (gate_scale_rows + block) * stride_sn, mask=s_ok, other=0.0)
        if PREQUANT:
            q = tl.reshape(x, [KP // 128, 128])
            qs = tl.load(xs_ptr + token * stride_xs + grp, mask=grp < tl.cdiv(K, 128), other=0.0)
        else:
            q, qs = _fp8_groups(x, KP, INTERPRET)  # once for the gate and the up rows
        xg = _fp8_operand(q, qs, sg[None, :], KP)
        xu = _fp8_operand(q, qs, su[None, :], KP)
    g = tl.sum(wg.to(tl.float32) * xg, axis=1)
    u = tl.sum(wu.to(tl.float32) * xu, axis=1)
    if QUANT == 2:  # per output channel
        s_row = s_ptr + e64 * stride_se
        g *= tl.load(s_row + n * stride_sn, mask=n_ok, other=0.0)
        u *= tl.load(s_row + (I + n) * stride_sn, mask=n_ok, other=0.0)
    store_rounded(act_ptr + slot.to(tl.int64) * stride_act + n, g / (1.0 + tl.exp(-g)) * u, n_ok, INTERPRET)


@triton.jit
def _down_weights(w_ptr, s_ptr, e64, held, n, H, K, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                  OFF: tl.constexpr, P: tl.constexpr, QUANT: tl.constexpr, ROWS: tl.constexpr):
    """Reduction columns OFF .. OFF + P of the down rows n of each held slot's expert e64 [SLOTS_P]:
    weights [SLOTS_P, ROWS, P] and, FP8, their block scales [SLOTS_P, P // 128] (the program's rows
    share one 128-row scale block)."""
    k = OFF + tl.arange(0, P)
    rows = held[:, None] & (n < H)[None, :]  # [SLOTS_P, ROWS]
    w = tl.load(w_ptr + e64[:, None, None] * stride_we + n[None, :, None].to(tl.int64) * stride_wn
                + k[None, None, :], mask=rows[:, :, None] & (k < K)[None, None, :], other=0.0,
                eviction_policy="evict_first")
    ws = 0.0
    if QUANT == 1:
        grp = OFF // 128 + tl.arange(0, P // 128)
        ws = tl.load(s_ptr + e64[:, None] * stride_se + (tl.program_id(1) * ROWS // 128) * stride_sn
                     + grp[None, :] * stride_sk, mask=held[:, None] & (grp < tl.cdiv(K, 128))[None, :], other=0.0)
    return w, ws


@triton.jit
def _down_part(w, ws, act_ptr, as_ptr, slot, held, K, stride_act, stride_as, OFF: tl.constexpr, P: tl.constexpr,
               SLOTS_P: tl.constexpr, QUANT: tl.constexpr, PREQUANT: tl.constexpr, INTERPRET: tl.constexpr):
    """[SLOTS_P, ROWS] float32: columns OFF .. OFF + P of each slot's activation row dotted with w."""
    k = OFF + tl.arange(0, P)
    slot64 = slot.to(tl.int64)
    a = tl.load(act_ptr + slot64[:, None] * stride_act + k[None, :], mask=held[:, None] & (k < K)[None, :],
                other=0.0).to(tl.float32)
    if QUANT == 1:
        if PREQUANT:
            grp = OFF // 128 + tl.arange(0, P // 128)
            q = tl.reshape(a, [SLOTS_P * (P // 128), 128])
            qs = tl.load(as_ptr + slot64[:, None] * stride_as + grp[None, :],
                         mask=held[:, None] & (grp < tl.cdiv(K, 128))[None, :], other=0.0)
            qs = tl.reshape(qs, [SLOTS_P * (P // 128)])
        else:
            q, qs = _fp8_groups(a, P, INTERPRET)
        a = _fp8_operand(q, qs, ws, P)
    return tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)


@triton.jit(do_not_specialize=["E"])
def _gemv_down_kernel(act_ptr, as_ptr, w_ptr, s_ptr, ids_ptr, tw_ptr, out_ptr, H, K, E,
                      stride_act, stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_out,
                      SLOTS: tl.constexpr, SLOTS_P: tl.constexpr, QUANT: tl.constexpr, PREQUANT: tl.constexpr,
                      INTERPRET: tl.constexpr, ROWS: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
                      P2: tl.constexpr, PDL: tl.constexpr):
    """Program (r, n-block) takes the SLOTS slots r*SLOTS .. r*SLOTS + SLOTS - 1 and writes
    out[r, n] = sum over those held of round(w[slot] * act[slot] . w2[e, n]), in float32. SLOTS = 1:
    one slot's row (fused_moe.combine sums them); SLOTS = top_k: the token's combined row. PREQUANT
    (FP8): act is already e4m3, with its group scales at as_ptr. The reduction runs in up to three
    power-of-two pieces P0, P1, P2 (0: none; reduction_pieces, GemvConfig.down_pieces), so that
    I = 768 need not be padded to 1024 lanes."""
    r = tl.program_id(0)
    n = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, SLOTS_P)
    slot = r * SLOTS + j
    # Before the wait: ids, routing weights and down rows come from before the gate/up kernel (module docstring).
    e = tl.load(ids_ptr + slot, mask=j < SLOTS, other=-1)
    held = (j < SLOTS) & (e >= 0) & (e < E)
    e64 = tl.where(held, e, 0).to(tl.int64)
    w0, ws0 = _down_weights(w_ptr, s_ptr, e64, held, n, H, K, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                            0, P0, QUANT, ROWS)
    if P1 > 0:
        w1, ws1 = _down_weights(w_ptr, s_ptr, e64, held, n, H, K, stride_we, stride_wn, stride_se, stride_sn,
                                stride_sk, P0, P1, QUANT, ROWS)
    if P2 > 0:
        w2, ws2 = _down_weights(w_ptr, s_ptr, e64, held, n, H, K, stride_we, stride_wn, stride_se, stride_sn,
                                stride_sk, P0 + P1, P2, QUANT, ROWS)
    tw = tl.load(tw_ptr + slot, mask=held, other=0.0)
    if QUANT == 2:  # per output channel
        wc = tl.load(s_ptr + e64[:, None] * stride_se + n[None, :] * stride_sn,
                     mask=held[:, None] & (n < H)[None, :], other=0.0)
    enter(PDL)
    y = _down_part(w0, ws0, act_ptr, as_ptr, slot, held, K, stride_act, stride_as, 0, P0, SLOTS_P, QUANT, PREQUANT,
                   INTERPRET)
    if P1 > 0:
        y += _down_part(w1, ws1, act_ptr, as_ptr, slot, held, K, stride_act, stride_as, P0, P1, SLOTS_P, QUANT,
                        PREQUANT, INTERPRET)
    if P2 > 0:
        y += _down_part(w2, ws2, act_ptr, as_ptr, slot, held, K, stride_act, stride_as, P0 + P1, P2, SLOTS_P, QUANT,
                        PREQUANT, INTERPRET)
    if QUANT == 2:
        y *= wc
    y *= tw[:, None]
    y = round_as(y, out_ptr.dtype.element_ty, INTERPRET)  # as y[slot] is stored before fused_moe's combine
    store_rounded(out_ptr + r.to(tl.int64) * stride_out + n, tl.sum(y, axis=0), n < H, INTERPRET)


def supports(weights: ExpertWeights) -> bool:
    """Whether the GEMVs take these experts: both reduction lengths held in registers."""
    return max(weights.hidden_size, weights.intermediate_size) <= MAX_K


def _lane_unit(quant: str) -> int:
    """The smallest reduction width a GEMV holds: FP8 whole 128-wide scale groups, else 16 lanes."""
    return FP8_GROUP if quant == "fp8" else 16


def padded_k(k: int, quant: str) -> int:
    """The register width of a reduction of length k in one piece (a power of two)."""
    return max(_lane_unit(quant), triton.next_power_of_2(k))


def up_constexprs(hidden: int, top_k: int, quant: str, cfg: GemvConfig) -> dict:
    """The gate/up GEMV's compile-time arguments for experts of this hidden size, top-k and weight
    format (INTERPRET and PDL come from the launch)."""
    return dict(TOP_K=top_k, QUANT=QUANT_CODES[quant], PREQUANT=quant == "fp8" and cfg.up_prequant,
                ROWS=cfg.up_rows, KP=padded_k(hidden, quant))


def reduction_pieces(k: int, quant: str, most: int = 3) -> tuple[int, int, int]:
    """A reduction of length k as up to `most` (1-3) power-of-two pieces, largest first, 0 for none: k
    rounded up to whole FP8 scale groups (16 elements otherwise) in binary (768 = 512 + 256, 1408 =
    1024 + 256 + 128), the rest padded into the last piece. most=1: one piece, padded_k(k, quant)."""
    unit = _lane_unit(quant)
    rest = -(-k // unit) * unit
    pieces = []
    while rest and len(pieces) < most - 1:
        pieces.append(1 << (rest.bit_length() - 1))
        rest -= pieces[-1]
    if rest:
        pieces.append(triton.next_power_of_2(rest))
    return tuple(pieces + [0] * (3 - len(pieces)))


def down_constexprs(inter: int, top_k: int, quant: str, cfg: GemvConfig) -> dict:
    """The down GEMV's compile-time arguments, as up_constexprs."""
    slots = top_k if cfg.combine else 1
    p0, p1, p2 = reduction_pieces(inter, quant, cfg.down_pieces)
    return dict(SLOTS=slots, SLOTS_P=triton.next_power_of_2(slots), QUANT=QUANT_CODES[quant],
                PREQUANT=quant == "fp8" and cfg.down_prequant, ROWS=cfg.down_rows, P0=p0, P1=p1, P2=p2)


def _activations(x: torch.Tensor, prequant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, scales) a GEMV reads: with prequant, x quantised once here (e4m3 and its group scales);
    otherwise x twice (the kernel does not read the second)."""
    return quantize_activations(x) if prequant else (x, x)


def _scale_strides(scale: torch.Tensor | None) -> tuple[int, int, int]:
    if scale is None:
        return 0, 0, 0
    return tuple(scale.stride()) + (0,) * (3 - scale.dim())


def gate_up(hidden: torch.Tensor, weights: ExpertWeights, ids: torch.Tensor, top_k: int,
            cfg: GemvConfig) -> torch.Tensor:
    """act [S, I] for flat ids [S] (rows of slots whose expert is not held here stay unwritten)."""
    h, inter = weights.hidden_size, weights.intermediate_size
    act = empty(ids.numel(), inter, dtype=hidden.dtype, device=hidden.device)
    scale = weights.w13_scale
    consts = up_constexprs(h, top_k, weights.quant, cfg)
    x, xs = _activations(hidden, consts["PREQUANT"])
    _gemv_up_kernel[(ids.numel(), triton.cdiv(inter, cfg.up_rows))](
        x, xs, weights.w13, weights.w13 if scale is None else scale, ids, act, inter, h, weights.num_experts,
        triton.cdiv(inter, FP8_GROUP), x.stride(0), xs.stride(0), weights.w13.stride(0), weights.w13.stride(1),
        *_scale_strides(scale), act.stride(0),
        INTERPRET=interpreting(), num_warps=cfg.up_warps, **consts, **launch_args(hidden))
    return act


def down(act: torch.Tensor, weights: ExpertWeights, ids: torch.Tensor, topk_w: torch.Tensor, top_k: int,
         cfg: GemvConfig) -> torch.Tensor:
    """With cfg.combine, out [T, H] (the tokens' combined rows); else y [S, H], each slot's row times its
    routing weight, for fused_moe.combine. ids and float32 topk_w are flat [S]."""
    h, inter = weights.hidden_size, weights.intermediate_size
    consts = down_constexprs(inter, top_k, weights.quant, cfg)
    out = empty(ids.numel() // consts["SLOTS"], h, dtype=act.dtype, device=act.device)
    scale = weights.w2_scale
    a, a_s = _activations(act, consts["PREQUANT"])
    _gemv_down_kernel[(out.shape[0], triton.cdiv(h, cfg.down_rows))](
        a, a_s, weights.w2, weights.w2 if scale is None else scale, ids, topk_w, out, h, inter, weights.num_experts,
        a.stride(0), a_s.stride(0), weights.w2.stride(0), weights.w2.stride(1), *_scale_strides(scale),
        out.stride(0), INTERPRET=interpreting(), num_warps=cfg.down_warps, **consts, **launch_args(act))
    return out
