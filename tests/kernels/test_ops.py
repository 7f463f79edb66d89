"""kernels.ops: the reference on CPU tensors, the Triton kernels on CUDA tensors, same results."""

import os

import torch
from kernel_cases import TOL, gpu, random_experts, random_hidden, random_routing, rel_err

from moeserve.kernels import ops
from moeserve.kernels import reference as ref
from moeserve.kernels.weights import ExpertWeights, quantize_experts


def test_cpu_tensors_take_the_reference(gen):
    # made where the generator lives (the GPU, on a GPU machine), then moved: dispatch follows the tensors
    hidden = random_hidden(5, 32, gen).cpu()
    w13, w2 = (t.cpu() for t in random_experts(4, 32, 16, gen))
    ids, w = (t.cpu() for t in random_routing(5, 4, 2, gen))
    assert torch.equal(ops.fused_experts(hidden, w13, w2, ids, w), ref.fused_experts(hidden, w13, w2, ids, w))
    for quant in ("fp8", "int8"):
        qw = quantize_experts(ExpertWeights(w13, w2), quant)
        got = ops.fused_experts_quantized(hidden, qw, ids, w)
        fn = ref.fused_experts_fp8 if quant == "fp8" else ref.fused_experts_int8
        assert torch.equal(got, fn(hidden, qw.w13, qw.w13_scale, qw.w2, qw.w2_scale, ids, w))
    logits = torch.randn(5, 16, generator=gen, device=gen.device).cpu()
    assert all(torch.equal(a, b) for a, b in zip(ops.softmax_topk(logits, 3, True), ref.softmax_topk(logits, 3, True)))


@gpu
def test_cuda_tensors_take_the_kernels(gen):
    hidden = random_hidden(33, 2048, gen)
    w13, w2 = random_experts(64, 2048, 1408, gen)
    ids, w = random_routing(33, 64, 6, gen)
    want = ref.fused_experts(hidden.float(), w13.float(), w2.float(), ids, w)
    assert rel_err(ops.fused_experts(hidden, w13, w2, ids, w), want) < TOL
    assert rel_err(ops.fused_experts_quantized(hidden, ExpertWeights(w13, w2), ids, w), want) < TOL
    logits = torch.randn(33, 64, generator=gen, device="cuda")
    got_w, got_ids = ops.softmax_topk(logits, 6, True)
    want_w, want_ids = ref.softmax_topk(logits, 6, True)
    assert torch.equal(got_ids, want_ids) and torch.allclose(got_w, want_w, atol=1e-6)
    # prompt steps of bf16 activations take the three-bf16 tensor-core GEMM
    x = torch.randn(ops.ROUTER_GEMM_MIN_TOKENS + 3, 2048, generator=gen, device="cuda").bfloat16()
    router = torch.randn(64, 2048, generator=gen, device="cuda") * 0.02
    torch.testing.assert_close(ops.router_logits(x, router), ref.router_logits(x, router), rtol=1e-5, atol=1e-4)
    # the router's decode kernel holds whole weight rows: wider hidden sizes take the float32 GEMM
    x = torch.randn(1, ops.ROUTER_GEMV_MAX_HIDDEN + 8, generator=gen, device="cuda")
    router = torch.randn(8, x.shape[1], generator=gen, device="cuda")
    torch.testing.assert_close(ops.router_logits(x, router), ref.router_logits(x, router))


def test_disabling_kernels_by_name():
    """MOESERVE_DISABLE_KERNELS switches named Triton kernels off (their ops run the reference) and
    refuses names it does not know, saying which it does."""
    import subprocess
    import sys

    code = "from moeserve.kernels import ops; print(sorted(ops.DISABLED))"
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "MOESERVE_DISABLE_KERNELS": "norm_rope, decode_attention"})
    assert ok.returncode == 0 and ok.stdout.strip() == "['decode_attention', 'norm_rope']"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MOESERVE_DISABLE_KERNELS": "rmsnorm"})
    assert bad.returncode != 0 and "unknown kernels ['rmsnorm']" in bad.stderr and "norm_rope" in bad.stderr

