"""The MoE and gating kernels compile for Hopper (sm_90) on a machine without a GPU
(tests/kernels/hopper_compile.py says why the interpreter's runs are not enough)."""

import pytest
import torch
from kernel_cases import random_experts, random_hidden, random_routing

from moeserve.kernels.weights import ExpertWeights, quantize_experts


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's bf16 arithmetic: values not checked here
def test_moe_and_gating_kernels_compile_for_hopper(gen):
    """Every specialisation the MoE and gating wrappers launch (bf16, FP8 and INT8 weights; one token
    through the per-slot path, a batch through the permutation; FP8 activations quantised up front or
    in the GEMM; TMA loads; swapped operands; the expert GEMVs), recorded from interpreter runs in bf16, compiles for
    sm_90: the interpreter checks values, not types. Run through the interpreter only (on a GPU they simply run)."""
    from moeserve.kernels import launch

    if not launch.interpreting():
        pytest.skip("records the interpreter's launches; on a GPU the kernel tests run them")
    from hopper_compile import LaunchRecorder, compile_for_hopper

    from moeserve.kernels import fused_moe, gating
    from moeserve.kernels.configs import GemmConfig, GemvConfig, MoeConfig

    e, h, i, k = 8, 128, 128, 2
    w13, w2 = random_experts(e, h, i, gen)
    bf16 = ExpertWeights(w13, w2)
    small = GemmConfig(block_n=32, block_k=128, num_warps=4, num_stages=3)
    tma = GemmConfig(block_n=32, block_k=128, num_warps=4, num_stages=3, tma=True)
    swapped = GemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, swap_ab=True)
    with LaunchRecorder() as rec:
        for weights in (bf16, quantize_experts(bf16, "fp8"), quantize_experts(bf16, "int8")):
            for t, cfg in ((1, MoeConfig(16, small, small, per_slot=True)),
                           (37, MoeConfig(16, small, small)),
                           (37, MoeConfig(16, small, small, prequant=weights.quant == "fp8")),
                           (37, MoeConfig(16, tma, tma, prequant=weights.quant == "fp8")),
                           (1, MoeConfig(16, swapped, swapped, per_slot=True, prequant=weights.quant == "fp8")),
                           (1, MoeConfig(gemv=GemvConfig(combine=False))),
                           (3, MoeConfig(gemv=GemvConfig(combine=True))),
                           (1, MoeConfig(gemv=GemvConfig(up_prequant=True, down_prequant=True)))):
                ids, w = random_routing(t, e, k, gen)
                fused_moe.fused_experts(random_hidden(t, h, gen), weights, ids, w, cfg)
        logits = torch.randn(37, 64, generator=gen).bfloat16()
        gating.softmax_topk(logits, 6, True)
        gating.softmax_topk(torch.randn(100, 64, generator=gen).bfloat16(), 6, True)  # several tokens per program
        gating.router_logits(random_hidden(3, h, gen), torch.randn(64, h, generator=gen))
        x = random_hidden(3, h, gen)  # with the decoder's add and post-attention norm
        gating.add_norm_router_logits(x, x, x[0], 1e-6, torch.randn(64, h, generator=gen))
        gating.router_logits_gemm(random_hidden(37, h, gen), torch.randn(64, h, generator=gen))
        gating.grouped_topk(logits, 6, n_group=8, topk_group=3, renormalize=True, scoring="sigmoid",
                         correction_bias=torch.zeros(64), routed_scaling_factor=2.5)
    jobs = rec.jobs()
    assert len(jobs) >= 10
    assert any("tensordesc" in t for j in jobs for t in j.types.values())  # the TMA loads were taken
    assert {j.kernel for j in jobs} >= {"_moe_gemm_kernel", "_combine_kernel", "_act_quant_kernel",
                                        "_gemv_up_kernel", "_gemv_down_kernel",
                                        "_softmax_topk_kernel", "_grouped_topk_kernel", "_router_logits_kernel",
                                        "_router_gemm_kernel"}
    assert compile_for_hopper(jobs) == {}
