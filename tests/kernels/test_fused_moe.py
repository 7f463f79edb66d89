"""The fused expert MLP (bf16, FP8 block-scaled, INT8 per-channel) against the reference oracle.

Every buffer the wrappers allocate is poisoned with NaN (conftest), so an unwritten output row, or
a kernel reading an unwritten intermediate row, fails the finite check.
"""

import dataclasses

import pytest
import torch
from kernel_cases import (DEVICE, FP8_ROW_TOL, FP8_TOL, ON_GPU, ROW_TOL, TOL, gpu, random_experts, random_hidden,
                          random_routing, rel_err, row_errs)

from moeserve.kernels import fused_moe
from moeserve.kernels import reference as ref
from moeserve.kernels.configs import GemmConfig, GemvConfig, MoeConfig, default_config
from moeserve.kernels.weights import ExpertWeights, quantize_experts

# Small tiles so that the CPU interpreter's tiny shapes still span several blocks in every dimension.
SMALL = MoeConfig(16, GemmConfig(block_n=16, block_k=32), GemmConfig(block_n=32, block_k=32))
WIDE_M = MoeConfig(32, GemmConfig(block_n=32, block_k=64), GemmConfig(block_n=32, block_k=64))
PER_SLOT = MoeConfig(16, GemmConfig(block_n=16, block_k=32), GemmConfig(block_n=32, block_k=32), per_slot=True)
# The same tiles loaded through TMA descriptors (weights; the down GEMM's activations too).
SMALL_TMA = MoeConfig(16, GemmConfig(block_n=16, block_k=32, tma=True), GemmConfig(block_n=32, block_k=32, tma=True))
WIDE_M_TMA = MoeConfig(32, GemmConfig(block_n=32, block_k=64, tma=True), GemmConfig(block_n=32, block_k=64, tma=True))
PER_SLOT_TMA = MoeConfig(16, GemmConfig(block_n=16, block_k=32, tma=True), GemmConfig(block_n=32, block_k=32, tma=True),
                         per_slot=True)
# Swapped operands (C.T = B @ A.T): the accumulator is transposed back before the epilogue.
SMALL_SWAP = MoeConfig(16, GemmConfig(block_n=16, block_k=32, swap_ab=True), GemmConfig(block_n=32, block_k=32, swap_ab=True))
PER_SLOT_SWAP = MoeConfig(16, GemmConfig(block_n=16, block_k=32, swap_ab=True),
                          GemmConfig(block_n=32, block_k=32, swap_ab=True), per_slot=True)
# The expert GEMVs (moe_gemv.py): per-slot down rows summed by the combine kernel, or combined in the GEMV.
GEMV = MoeConfig(gemv=GemvConfig(up_rows=8, down_rows=16, combine=False, down_pieces=3))  # I as 2-3 pieces
GEMV_COMBINE = MoeConfig(gemv=GemvConfig(up_rows=4, down_rows=8, up_warps=8, combine=True))
# FP8 activations quantised by their own launch before each GEMV
GEMV_PREQUANT = MoeConfig(gemv=GemvConfig(up_rows=8, down_rows=16, combine=False, up_prequant=True, down_prequant=True,
                                          down_pieces=2))
GEMV_COMBINE_PREQUANT = MoeConfig(gemv=GemvConfig(up_rows=4, down_rows=8, combine=True, up_prequant=True,
                                                  down_prequant=True))


def oracle(hidden, weights: ExpertWeights, ids, w):
    """The reference in float64 on the CPU (small) or float32 on the GPU (real shapes)."""
    dt = torch.float32 if ON_GPU else torch.float64
    if weights.quant == "fp8":
        return ref.fused_experts_fp8(hidden, weights.w13, weights.w13_scale, weights.w2, weights.w2_scale, ids, w)
    if weights.quant == "int8":
        return ref.fused_experts_int8(hidden, weights.w13, weights.w13_scale, weights.w2, weights.w2_scale, ids, w)
    return ref.fused_experts(hidden.to(dt), weights.w13.to(dt), weights.w2.to(dt), ids, w.to(dt))


def check(hidden, weights, ids, w, config=None, tol=TOL):
    out = fused_moe.fused_experts(hidden, weights, ids, w, config)
    want = oracle(hidden, weights, ids, w)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    row_tol = ROW_TOL
    if weights.quant == "fp8":  # see kernel_cases.FP8_TOL
        tol, row_tol = max(tol, FP8_TOL), FP8_ROW_TOL
    err = rel_err(out, want)
    assert err < tol, f"relative error {err:.2e} >= {tol}"
    rows = row_errs(out, want)
    assert (rows < row_tol).all(), f"rows {(rows >= row_tol).nonzero().flatten().tolist()} wrong"
    nothing_held = (ids < 0).all(dim=1) | (w == 0).all(dim=1)
    assert (out[nothing_held] == 0).all()
    return out


CASES = [  # (T, H, I, E, k, drop, config)
    (1, 64, 32, 8, 2, 0.0, SMALL),  # one token
    (3, 64, 32, 16, 2, 0.0, SMALL),  # most experts without tokens
    (5, 64, 32, 4, 4, 0.0, SMALL),  # top-k == number of experts
    (37, 80, 48, 8, 3, 0.0, SMALL),  # T, H and I not multiples of the blocks
    (21, 64, 32, 6, 2, 0.3, SMALL),  # slots held elsewhere (-1)
    (70, 64, 64, 4, 2, 0.0, WIDE_M),  # several blocks per expert
    (9, 64, 32, 8, 2, 0.0, None),  # the configuration table / defaults
    (1, 64, 32, 8, 2, 0.0, None),  # defaults at one token: the per-slot decode path
    (1, 80, 48, 8, 3, 0.0, PER_SLOT),  # per-slot, H and I not multiples of the blocks
    (11, 64, 32, 4, 3, 0.3, PER_SLOT),  # per-slot with experts shared by tokens and slots held elsewhere
    (37, 80, 48, 8, 3, 0.0, SMALL_TMA),  # TMA: tiles past N, K and the runs' rows
    (21, 64, 32, 6, 2, 0.3, SMALL_TMA),  # TMA with slots held elsewhere
    (70, 64, 64, 4, 2, 0.0, WIDE_M_TMA),  # TMA, several blocks per expert
    (1, 80, 48, 8, 3, 0.0, PER_SLOT_TMA),  # TMA on the per-slot path (weights only)
    (37, 80, 48, 8, 3, 0.0, SMALL_SWAP),  # swapped operands, tiles past N, K and the runs' rows
    (21, 64, 32, 6, 2, 0.3, SMALL_SWAP),
    (1, 80, 48, 8, 3, 0.0, PER_SLOT_SWAP),  # swapped on the per-slot decode path
    (11, 64, 32, 4, 3, 0.3, PER_SLOT_SWAP),
    (1, 64, 32, 8, 2, 0.0, GEMV),  # the GEMVs at one token
    (1, 80, 48, 8, 3, 0.0, GEMV_COMBINE),  # H and I not multiples of the columns per program
    (5, 64, 32, 4, 4, 0.0, GEMV_COMBINE),  # top-k == number of experts, experts shared by tokens
    (11, 80, 48, 6, 3, 0.3, GEMV),  # slots held elsewhere
    (11, 80, 48, 6, 3, 0.3, GEMV_COMBINE),
]


@pytest.mark.parametrize("t,h,i,e,k,drop,config", CASES)
def test_bf16_matches_reference(t, h, i, e, k, drop, config, gen):
    hidden = random_hidden(t, h, gen)
    w13, w2 = random_experts(e, h, i, gen)
    ids, w = random_routing(t, e, k, gen, drop=drop)
    check(hidden, ExpertWeights(w13, w2), ids, w, config)


def test_every_token_to_one_expert(gen):
    hidden = random_hidden(40, 64, gen)
    w13, w2 = random_experts(8, 64, 32, gen)
    ids = torch.full((40, 2), 5, device=DEVICE)
    ids[:, 1] = 2
    w = torch.rand(40, 2, generator=gen, device=DEVICE)
    check(hidden, ExpertWeights(w13, w2), ids, w, SMALL)


def test_token_with_no_expert_held_here_is_zero(gen):
    hidden = random_hidden(6, 64, gen)
    w13, w2 = random_experts(4, 64, 32, gen)
    ids, w = random_routing(6, 4, 2, gen)
    ids[2] = -1
    ids[4, 0] = -1
    out = check(hidden, ExpertWeights(w13, w2), ids, w, SMALL)
    assert (out[2] == 0).all()


QUANT_SHAPES = [(1, 128, 64, 8, 2, 0.0), (29, 256, 192, 6, 3, 0.2), (6, 160, 96, 4, 4, 0.0)]


@pytest.mark.parametrize("quant,prequant,tma,swap", [
    ("fp8", False, False, False), ("fp8", True, False, False), ("int8", False, False, False),
    ("fp8", False, True, False), ("fp8", True, True, False), ("int8", False, True, False),
    ("fp8", False, False, True), ("fp8", True, False, True), ("int8", False, False, True)])
@pytest.mark.parametrize("t,h,i,e,k,drop", QUANT_SHAPES)
def test_quantized_match_dequantized_reference(quant, prequant, tma, swap, t, h, i, e, k, drop, gen):
    """I = 96 / 192 are not multiples of 128: gate and up keep separate FP8 scale grids. prequant:
    activations quantised once by their own kernel instead of inside the GEMMs. tma: FP8 / INT8
    weight tiles (and prequantised activations) through TMA descriptors. swap: C.T = B @ A.T."""
    hidden = random_hidden(t, h, gen)
    weights = quantize_experts(ExpertWeights(*random_experts(e, h, i, gen)), quant)
    ids, w = random_routing(t, e, k, gen, drop=drop)
    cfg = MoeConfig(16, GemmConfig(block_n=32, block_k=128, tma=tma, swap_ab=swap),
                    GemmConfig(block_n=64, block_k=128, tma=tma, swap_ab=swap), per_slot=t == 1, prequant=prequant)
    check(hidden, weights, ids, w, cfg)


@pytest.mark.parametrize("quant", ["fp8", "int8"])
@pytest.mark.parametrize("config", [GEMV, GEMV_COMBINE, GEMV_PREQUANT, GEMV_COMBINE_PREQUANT],
                         ids=["gemv", "gemv_combine", "gemv_prequant", "gemv_combine_prequant"])
@pytest.mark.parametrize("t,h,i,e,k,drop", [(1, 128, 64, 8, 2, 0.0), (4, 256, 384, 6, 3, 0.2), (6, 160, 96, 4, 4, 0.0)])
def test_quantized_gemv_matches_dequantized_reference(quant, config, t, h, i, e, k, drop, gen):
    """The GEMVs quantise each activation row per 128-wide group themselves, or read rows quantised
    by their own launch (FP8; INT8 ignores it), at decode sizes; H = 160 and I = 96 leave partial
    scale groups, and I = 384 runs as 256 + 128 where the down GEMV splits its reduction."""
    hidden = random_hidden(t, h, gen)
    weights = quantize_experts(ExpertWeights(*random_experts(e, h, i, gen)), quant)
    ids, w = random_routing(t, e, k, gen, drop=drop)
    check(hidden, weights, ids, w, config)


@pytest.mark.parametrize("r,k", [(1, 128), (37, 200)])
def test_activation_quantisation_matches_reference(r, k, gen):
    x = random_hidden(r, k, gen) * 3
    q, s = fused_moe.quantize_activations(x)
    want_q, want_s = ref.act_quant_fp8(x)
    torch.testing.assert_close(s.cpu(), want_s.cpu(), rtol=1e-6, atol=0)
    same = (q.float() == want_q.float()).float().mean().item()
    assert same > 0.999, f"only {same:.4f} of the e4m3 values match"


@pytest.mark.parametrize("quant,tol", [("fp8", 0.12), ("int8", 0.03)])
def test_quantized_close_to_unquantized(quant, tol, gen):
    """Quantisation error itself stays what the formats allow (FP8 e4m3: a few percent)."""
    hidden = random_hidden(8, 256, gen)
    full = ExpertWeights(*random_experts(4, 256, 128, gen))
    ids, w = random_routing(8, 4, 2, gen)
    out = fused_moe.fused_experts(hidden, quantize_experts(full, quant), ids, w)
    assert rel_err(out, oracle(hidden, full, ids, w)) < tol


# Real shapes on a GPU (experts trimmed where the float32 reference would not fit).
REAL = {  # name: (H, I, E, k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseek-v3-32of256": (7168, 2048, 32, 8),
}


@gpu
@pytest.mark.parametrize("name", list(REAL))
@pytest.mark.parametrize("t", [1, 3, 7, 64, 333, 4096])  # 3: the table's 4-token bucket
def test_real_shapes_bf16(name, t, gen):
    h, i, e, k = REAL[name]
    hidden = random_hidden(t, h, gen)
    ids, w = random_routing(t, e, k, gen, drop=0.05)
    check(hidden, ExpertWeights(*random_experts(e, h, i, gen)), ids, w)


@gpu
@pytest.mark.parametrize("quant", ["fp8", "int8"])
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3-32of256"])
@pytest.mark.parametrize("t", [1, 3, 64, 1024])
def test_real_shapes_quantized(quant, name, t, gen):
    h, i, e, k = REAL[name]
    hidden = random_hidden(t, h, gen)
    weights = quantize_experts(ExpertWeights(*random_experts(e, h, i, gen)), quant)
    ids, w = random_routing(t, e, k, gen)
    check(hidden, weights, ids, w)
    if quant == "fp8":  # both activation paths, whichever the table picked (defaults fit either)
        for prequant in (False, True):
            cfg = default_config(t, e, h, i, k, quant)
            check(hidden, weights, ids, w, MoeConfig(cfg.block_m, cfg.up, cfg.down, cfg.per_slot, prequant))


def real_problem(name, t, quant, gen):
    """A real shape's random experts (quantised unless bf16), t tokens with 5% of slots held elsewhere,
    and the default configuration for them: (hidden, weights, ids, w, config)."""
    h, i, e, k = REAL[name]
    hidden = random_hidden(t, h, gen)
    weights = ExpertWeights(*random_experts(e, h, i, gen))
    if quant != "bf16":
        weights = quantize_experts(weights, quant)
    ids, w = random_routing(t, e, k, gen, drop=0.05)
    return hidden, weights, ids, w, default_config(t, e, h, i, k, quant)


@gpu
@pytest.mark.parametrize("quant", ["bf16", "fp8"])
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b"])
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_real_shapes_through_tma(quant, name, t, gen):
    """The default tiles with their loads through TMA descriptors, whatever the table picked."""
    hidden, weights, ids, w, cfg = real_problem(name, t, quant, gen)
    check(hidden, weights, ids, w, dataclasses.replace(cfg, up=dataclasses.replace(cfg.up, tma=True),
                                                       down=dataclasses.replace(cfg.down, tma=True)))


@gpu
@pytest.mark.parametrize("quant", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b"])
@pytest.mark.parametrize("t", [1, 8, 64])
def test_real_shapes_swapped(quant, name, t, gen):
    """Decode tiles with swapped operands (64 weight rows: a Hopper warpgroup tile), each activation
    path, whatever the table picked."""
    hidden, weights, ids, w, cfg = real_problem(name, t, quant, gen)
    up = dataclasses.replace(cfg.up, block_n=64, swap_ab=True)
    dn = dataclasses.replace(cfg.down, block_n=64, swap_ab=True)
    for prequant in ([False, True] if quant == "fp8" else [False]):
        check(hidden, weights, ids, w, MoeConfig(16, up, dn, cfg.per_slot, prequant))


@gpu
@pytest.mark.parametrize("quant", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("name", list(REAL))
@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("combine", [False, True])
def test_real_shapes_gemv(quant, name, t, combine, gen):
    """The expert GEMVs at decode sizes, whatever the table picked; FP8 also with prequantised rows; the
    down reduction in one padded piece and in up to three."""
    hidden, weights, ids, w, _ = real_problem(name, t, quant, gen)
    for prequant in ([False, True] if quant == "fp8" else [False]):
        check(hidden, weights, ids, w, MoeConfig(gemv=GemvConfig(up_rows=2, down_rows=2, combine=combine,
                                                                 up_prequant=prequant, down_prequant=prequant,
                                                                 down_pieces=1 if prequant else 3)))


def test_warm_up_runs_each_launch_signature_once(gen, monkeypatch):
    """fused_moe.warm_up: one call, at its smallest token count, for each distinct launch signature of
    1..max_tokens tokens, so every step size after it finds its kernels compiled. Here (no table for
    this device: the default configuration) 1 token takes the per-slot path, 2..32 the small tiles,
    33..40 the next ones."""
    weights = ExpertWeights(*random_experts(4, 32, 16, gen))
    ran = []
    real = fused_moe.fused_experts

    def counting(hidden, *args, **kwargs):
        ran.append(hidden.shape[0])
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(fused_moe, "fused_experts", counting)
    # the default configuration here, also on a GPU whose table has this shape's buckets
    monkeypatch.setattr(fused_moe, "get_config", lambda _device, *args: default_config(*args))
    counts = fused_moe.warm_up(weights, 2, 40, weights.w13.dtype)
    assert counts == ran == [1, 2, 33]
    device = weights.w13.device
    every = {fused_moe.launch_signature(t, weights, 2, device) for t in range(1, 41)}
    assert {fused_moe.launch_signature(t, weights, 2, device) for t in counts} == every
    # past FUSED_MAX_SLOTS the number of counting chunks (rounded up to a power of two) is in it too
    big = [fused_moe.launch_signature(t, weights, 2, device)[1:] for t in (2048, 2049, 4096, 4097, 8192)]
    assert big == [(True, 1), (False, 2), (False, 2), (False, 4), (False, 4)]
