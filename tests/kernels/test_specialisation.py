"""Step sizes never specialise a kernel.

Triton compiles a kernel again for each class of its integer arguments (equal to 1, a multiple of 16,
anything else) unless the argument is marked do_not_specialize. A kernel whose token count is
specialised compiles once more the first time a step of a new class comes (a batch of 3841 tokens
after steps of 256 and 4096): on an H200 one such compile of the top-k kernel stalled a served
DeepSeek-V2-Lite step for 670 ms (docs/benchmarks.md, fourteenth session). Every argument that
changes from one step to the next is listed here, kernel by kernel."""

from __future__ import annotations

import pytest

from moeserve.kernels import align, decode_attention, fused_moe, gating, gemv, norm_rope, numerics, prefill_attention

STEP_SIZES = {  # kernel: its arguments that change with the step's tokens, sequences or contexts
    gating._router_logits_kernel: ["T"],
    gating._router_gemm_kernel: ["T"],
    gating._softmax_topk_kernel: ["T"],
    gating._grouped_topk_kernel: ["T"],
    norm_rope._rms_norm_kernel: ["rows"],
    gemv._gemv_kernel: ["M"],
    numerics._act_quant_kernel: ["R"],
    align._count_kernel: ["S"],
    align._scatter_kernel: ["S", "num_chunks", "max_padded"],
    fused_moe._moe_gemm_kernel: ["S", "max_blocks"],
    prefill_attention._prefill_kernel: ["num_seqs", "stride_tb"],
    decode_attention._split_kernel: ["chunk", "direct", "stride_tb"],
    decode_attention._merge_kernel: ["splits"],
}


def _unspecialised(kernel) -> set[str]:
    """The argument names a kernel does not specialise on: the interpreter keeps them as given, a
    compiled JITFunction as indices."""
    given = kernel.kwargs.get("do_not_specialize") if hasattr(kernel, "kwargs") else kernel.do_not_specialize
    return {kernel.arg_names[a] if isinstance(a, int) else a for a in given or []}


@pytest.mark.parametrize("kernel", list(STEP_SIZES), ids=lambda k: k.__name__)
def test_step_sizes_do_not_specialise(kernel):
    missing = set(STEP_SIZES[kernel]) - _unspecialised(kernel)
    assert not missing, f"{kernel.__name__} specialises on {sorted(missing)}: a new step size would compile it again"
