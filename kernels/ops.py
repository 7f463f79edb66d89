"""The one place that chooses how the kernel ops run (MoE experts, gating, paged decode attention,
RMSNorm and rotary embeddings, decode-size linear layers):
Triton kernels on CUDA, the plain-torch reference elsewhere.

Models and expert groups call these functions and never import a kernel or the reference directly.
The Triton modules are imported on the first CUDA call only, so CPU-only machines never need Triton
(and the test suite can switch on its interpreter before any kernel is defined).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import reference
from .weights import ExpertWeights, load_experts, quantize_experts, stack_experts

__all__ = [
    "ExpertWeights",
    "add_rms_norm",
    "apply_rotary",
    "fused_experts",
    "fused_experts_quantized",
    "grouped_topk",
    "linear",
    "mla_rope_and_cache",
    "load_experts",
    "paged_decode_attention",
    "paged_prefill_attention",
    "quantize_experts",
    "rms_norm",
    "rope_and_cache",
    "silu_mul",
    "router_logits",
    "softmax_topk",
    "stack_experts",
]


# Triton kernels an operator has switched off (comma-separated module names, e.g. "norm_rope"): those
# ops run the reference on CUDA too. For isolating a suspected kernel fault without a new build.
DISABLED = frozenset(filter(None, (n.strip() for n in os.environ.get("MOESERVE_DISABLE_KERNELS", "").split(","))))
KERNEL_MODULES = ("fused_moe", "gating", "decode_attention", "prefill_attention", "norm_rope", "gemv",
                  "activation")
ROUTER_GEMV_MAX_TOKENS = 16  # the router's logits in one Triton launch up to here (decode), cuBLAS beyond
ROUTER_GEMV_MAX_HIDDEN = 16384  # ... for hidden sizes up to here (a program holds whole weight rows)
# From here, bf16 activations take the three-bf16 router GEMM: on an H100 (benchmarks/bench_router.py, hidden 2048)
# 41 against 88 us at 4096 tokens and 81 against 152 at 8192, but 39 against 15-30 us at 256-1024
ROUTER_GEMM_MIN_TOKENS = 2048
# Linear layers as a Triton GEMV up to here, cuBLAS beyond: on an H200 (benchmarks/bench_gemv.py) the GEMV took
# 0.51-0.85x cuBLAS's time at one row and 1.2-2.2x at eight (each row reduced on its own)
LINEAR_GEMV_MAX_ROWS = 1
# ... and from there up to here on tensor cores (gemv.linear_mma), cuBLAS beyond; and only for weights of at
# most LINEAR_MMA_MAX_N outputs (not the LM heads: cuBLAS streams those at about 94% of the bandwidth) and
# LINEAR_MMA_MAX_K inputs. In CUDA-graph decode steps of 16 on an H100 (benchmarks/profile_engine.py) the kernel
# on Qwen3-30B-A3B's o_proj (K 4096) made the step 0.6 ms slower (15.46 against 14.87 ms with cuBLAS), although
# alone it took 9.3 us against cuBLAS's 10.8 (benchmarks/bench_gemv.py); kept to K <= 2048 the step took
# 14.79 ms, and DeepSeek-V2-Lite's 10.06 against 10.20. (In the twenty-fourth session's steps K 4096 took
# 14.84 ms against 14.85: even, so the limit stayed.)
LINEAR_MMA_MAX_ROWS = 16
LINEAR_MMA_MAX_N = 32768
LINEAR_MMA_MAX_K = 2048
# A decoder's add and next RMSNorm folded into the tensor-core projection after it (gemv.add_norm_linear_mma) for
# 2 rows up to here: 0, off, until a GPU run times it in decode steps (benchmarks/profile_variants.py); the norm
# kernel and linear_mma run apart meanwhile.
ADD_NORM_MMA_MAX_ROWS = 0
# A decoder's add and post-attention RMSNorm folded into the router's logits (gating.add_norm_router_logits) for
# 1 token up to here: 0, off, until a GPU run times it in decode steps (benchmarks/profile_variants.py).
ADD_NORM_ROUTER_MAX_TOKENS = 0
if DISABLED - set(KERNEL_MODULES):
    raise ValueError(f"MOESERVE_DISABLE_KERNELS names unknown kernels {sorted(DISABLED - set(KERNEL_MODULES))}; "
                     f"choose from {', '.join(KERNEL_MODULES)}")


def _on_gpu(t: torch.Tensor, kernel: str) -> bool:
    return t.is_cuda and kernel not in DISABLED


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of the routed experts for hidden [T, H]; see kernels/reference.py for layouts."""
    if _on_gpu(hidden, "fused_moe"):
        from . import fused_moe

        return fused_moe.fused_experts(hidden, ExpertWeights(w13, w2), topk_ids, topk_weights)
    return reference.fused_experts(hidden, w13, w2, topk_ids, topk_weights)


def warm_up_experts(w13: torch.Tensor, w2: torch.Tensor, top_k: int, max_tokens: int,
                    dtype: torch.dtype) -> list[int]:
    """Compile, by running them once, the expert kernels that calls of up to max_tokens tokens
    launch (fused_moe.warm_up); nothing to do for the reference. Returns the token counts run."""
    if not _on_gpu(w13, "fused_moe"):
        return []
    from . import fused_moe

    return fused_moe.warm_up(ExpertWeights(w13, w2), top_k, max_tokens, dtype)


def fused_experts_quantized(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """fused_experts for any ExpertWeights (bf16, FP8 block-scaled or INT8 per-channel)."""
    if _on_gpu(hidden, "fused_moe"):
        from . import fused_moe

        return fused_moe.fused_experts(hidden, weights, topk_ids, topk_weights)
    if weights.quant == "fp8":
        return reference.fused_experts_fp8(hidden, weights.w13, weights.w13_scale, weights.w2,
                                           weights.w2_scale, topk_ids, topk_weights)
    if weights.quant == "int8":
        return reference.fused_experts_int8(hidden, weights.w13, weights.w13_scale, weights.w2,
                                            weights.w2_scale, topk_ids, topk_weights)
    return reference.fused_experts(hidden, weights.w13, weights.w2, topk_ids, topk_weights)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K]. On CUDA, in bf16 or fp16, up to LINEAR_GEMV_MAX_ROWS
    rows run as one Triton GEMV and up to LINEAR_MMA_MAX_ROWS as its tensor-core form (kernels/gemv.py) for
    the weights it wins on; everything else, and the CPU, is F.linear itself."""
    most = max(LINEAR_GEMV_MAX_ROWS, LINEAR_MMA_MAX_ROWS)
    if _on_gpu(x, "gemv") and x.dim() >= 2 and x.numel() <= most * x.shape[-1]:
        from . import gemv

        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= LINEAR_GEMV_MAX_ROWS and gemv.supports(x2, weight):
            return gemv.linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
        if _takes_mma(x2, weight):
            return gemv.linear_mma(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _takes_mma(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear() runs rows x [M, K] (M past LINEAR_GEMV_MAX_ROWS) through gemv.linear_mma: the rows and the
    weights it gained on (LINEAR_MMA_MAX_*), and a call the kernel takes."""
    from . import gemv

    return (x.shape[0] <= LINEAR_MMA_MAX_ROWS and weight.shape[0] <= LINEAR_MMA_MAX_N
            and x.shape[1] <= LINEAR_MMA_MAX_K and gemv.supports_mma(x, weight))


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] @ weight [E, H]^T in float32 (reference.router_logits): the router's weight stays
    float32 whatever the compute dtype (models/loader.py). On CUDA, decode sizes: one Triton launch
    (gating.router_logits); prompt steps of ROUTER_GEMM_MIN_TOKENS or more in bf16: the three-bf16
    tensor-core GEMM (gating.router_logits_gemm); else one float32 GEMM."""
    if _on_gpu(x, "gating"):
        from . import gating

        if 1 <= x.shape[0] <= ROUTER_GEMV_MAX_TOKENS and x.shape[1] <= ROUTER_GEMV_MAX_HIDDEN:
            return gating.router_logits(x, weight)
        if x.shape[0] >= ROUTER_GEMM_MIN_TOKENS and x.dtype == torch.bfloat16 and weight.dtype == torch.float32:
            return gating.router_logits_gemm(x, weight)
    return reference.router_logits(x, weight)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax gating: (weights [T, k] float32, ids [T, k] int64)."""
    if _on_gpu(logits, "gating"):
        from . import gating

        return gating.softmax_topk(logits, k, renormalize)
    return reference.softmax_topk(logits, k, renormalize)


def grouped_topk(logits: torch.Tensor, k: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited gating (DeepSeek-V2/V3); keyword arguments as reference.grouped_topk."""
    if _on_gpu(logits, "gating"):
        from . import gating

        return gating.grouped_topk(logits, k, **kwargs)
    return reference.grouped_topk(logits, k, **kwargs)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_len: int,
    sliding_window: int | None = None,
    settled: bool = False,
) -> torch.Tensor:
    """One query per sequence over its paged KV cache; see kernels/reference.py for the layouts, and
    decode_attention.paged_decode_attention for what `settled` promises."""
    if _on_gpu(q, "decode_attention"):
        from . import decode_attention

        return decode_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                       max_len, sliding_window, settled=settled)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_len,
                                            sliding_window)


def decode_attention_in_place(device: torch.device) -> bool:
    """Whether paged_decode_attention reads the cache in place on this device (the kernel) rather than
    gathering contexts into padded tensors (the reference, on CPU or with the kernel switched off)."""
    return device.type == "cuda" and "decode_attention" not in DISABLED


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    plan: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt chunks (any cached prefix) over their paged KV cache; see kernels/reference.py. `plan`: the
    kernel's fixed launch plan on the device (prefill_attention.fixed_plan; the kernel only)."""
    if _on_gpu(q, "prefill_attention"):
        from . import prefill_attention

        return prefill_attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_lens,
                                                         context_lens, scale, sliding_window, plan=plan)
    if plan is not None:
        raise ValueError("a fixed launch plan is the prefill attention kernel's (CUDA) alone")
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale,
                                             sliding_window)


def prefill_attention_in_place(device: torch.device, head_dim: int, value_dim: int, num_heads: int,
                               num_kv_heads: int) -> bool:
    """Whether paged_prefill_attention runs the kernel for these heads on this device (reading the cache
    in place); else the models keep their padded prefill attention (CPU, other widths, switched off)."""
    if device.type != "cuda" or "prefill_attention" in DISABLED:
        return False
    from . import prefill_attention

    return prefill_attention.supports(head_dim, value_dim, num_heads, num_kv_heads)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension in float32, weight applied after the cast back (reference.rms_norm)."""
    if _on_gpu(x, "norm_rope"):
        from . import norm_rope

        return norm_rope.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused into the next norm on CUDA."""
    if _on_gpu(x, "norm_rope"):
        from . import norm_rope

        return norm_rope.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(add_rms_norm(x, residual, norm_weight, eps)[0], weight, bias), x + residual): a decoder's
    add, its next norm and the projection after it. One row on CUDA in 16-bit floats with the norm
    weight in the same dtype: one Triton launch (gemv.add_norm_linear); 2..ADD_NORM_MMA_MAX_ROWS rows
    where linear() would take linear_mma: one launch of its fused form; else the two calls."""
    if _on_gpu(x, "gemv") and _on_gpu(x, "norm_rope"):
        from . import gemv

        if gemv.supports_add_norm(x, residual, norm_weight, weight):
            return gemv.add_norm_linear(x, residual, norm_weight, eps, weight, bias)
        if (x.dim() == 2 and 2 <= x.shape[0] <= ADD_NORM_MMA_MAX_ROWS and _takes_mma(x, weight)
                and gemv.supports_add_norm_mma(x, residual, norm_weight, weight)):
            return gemv.add_norm_linear_mma(x, residual, norm_weight, eps, weight, bias)
    h, total = add_rms_norm(x, residual, norm_weight, eps)
    return linear(h, weight, bias), total


def add_rms_norm_router_logits(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                               router_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, x + residual, router_logits(h, router_weight)) with h = add_rms_norm(x, residual, norm_weight, eps)[0]:
    a decoder's add, its post-attention norm and the MoE router's logits. On CUDA up to
    ADD_NORM_ROUTER_MAX_TOKENS tokens the kernel takes: one launch (gating.add_norm_router_logits); else the calls
    one after the other."""
    if _on_gpu(x, "gating") and _on_gpu(x, "norm_rope") and x.shape[0] <= ADD_NORM_ROUTER_MAX_TOKENS:
        from . import gating

        if gating.supports_add_norm_router(x, residual, norm_weight, router_weight):  # its rows, dims, dtypes
            return gating.add_norm_router_logits(x, residual, norm_weight, eps, router_weight)
    h, total = add_rms_norm(x, residual, norm_weight, eps)
    return h, total, router_logits(h, router_weight)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x [T, heads, dim] by cos, sin [T, dim/2] (reference.apply_rotary)."""
    if _on_gpu(x, "norm_rope"):
        from . import norm_rope

        return norm_rope.apply_rotary(x, cos, sin, interleaved)
    return reference.apply_rotary(x, cos, sin, interleaved)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                   eps: float = 0.0) -> torch.Tensor:
    """q/k RMSNorm (with weights), rotary embedding, and k, v into the paged caches; the rotated q
    (reference.rope_and_cache). One launch on CUDA instead of six."""
    if _on_gpu(q, "norm_rope"):
        from . import norm_rope

        return norm_rope.rope_and_cache(q, k, v, cos, sin, interleaved, k_cache, v_cache, slot_mapping,
                                        q_weight, k_weight, eps)
    return reference.rope_and_cache(q, k, v, cos, sin, interleaved, k_cache, v_cache, slot_mapping,
                                    q_weight, k_weight, eps)


def mla_rope_and_cache(q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, weight: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> torch.Tensor:
    """MLA's rotary embeddings, latent RMSNorm and cache write (reference.mla_rope_and_cache); one
    launch on CUDA instead of five."""
    if _on_gpu(q_pe, "norm_rope"):
        from . import norm_rope

        return norm_rope.mla_rope_and_cache(q_pe, latent, k_pe, weight, eps, cos, sin, interleaved, cache,
                                            slot_mapping)
    return reference.mla_rope_and_cache(q_pe, latent, k_pe, weight, eps, cos, sin, interleaved, cache, slot_mapping)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a SwiGLU MLP (reference.silu_mul): one launch on CUDA instead of two."""
    if _on_gpu(gate, "activation") and gate.dim() == 2:
        from . import activation

        return activation.silu_mul(gate, up)
    return reference.silu_mul(gate, up)
