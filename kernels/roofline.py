"""The physical limit of one fused-experts call: the fewest bytes it must move and the FLOPs it must do.

The limit time is max(bytes / bandwidth, flops / peak), with both ceilings measured on the GPU at
hand (a large device copy and a large bf16 matmul); a kernel's share of the limit is limit / time.
"""

from __future__ import annotations

from dataclasses import dataclass

SCALE_BLOCK = 128  # FP8 weight scale blocks are 128x128 (DeepSeek-V3)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ExpertShape:
    """One model's routed-expert shape: hidden size, intermediate size, experts, experts per token."""

    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int


SHAPES = {
    s.name: s
    for s in (
        ExpertShape("qwen3-30b-a3b", 2048, 768, 128, 8),
        ExpertShape("deepseek-v2-lite", 2048, 1408, 64, 6),
        ExpertShape("mixtral-8x7b", 4096, 14336, 8, 2),
        ExpertShape("deepseek-v3", 7168, 2048, 256, 8),
    )
}


def expert_bytes(shape: ExpertShape, quant: str) -> int:
    """Bytes of one expert's weights (gate, up, down) and their scales."""
    h, i = shape.hidden, shape.inter
    if quant == "bf16":
        return 3 * h * i * 2
    if quant == "fp8":
        blocks = 2 * _cdiv(i, SCALE_BLOCK) * _cdiv(h, SCALE_BLOCK) + _cdiv(h, SCALE_BLOCK) * _cdiv(i, SCALE_BLOCK)
        return 3 * h * i + 4 * blocks
    if quant == "int8":
        return 3 * h * i + 4 * (2 * i + h)
    raise ValueError(f"quant must be 'bf16', 'fp8' or 'int8', got {quant!r}")


def min_bytes(shape: ExpertShape, num_tokens: int, experts_hit: float, quant: str) -> float:
    """Each touched expert's weights once, the bf16 input and output once, the routing once."""
    activations = 2 * num_tokens * shape.hidden * 2
    routing = num_tokens * shape.top_k * (8 + 4)  # int64 ids, float32 weights
    return experts_hit * expert_bytes(shape, quant) + activations + routing


def flops(shape: ExpertShape, held_slots: float) -> float:
    """Multiply-adds of the three expert GEMMs over the held (token, expert) pairs, times two."""
    return 2.0 * held_slots * 3 * shape.hidden * shape.inter


def limit_ms(num_bytes: float, num_flops: float, bandwidth: float, peak: float) -> float:
    """The floor in milliseconds, bandwidth in bytes/s and peak in FLOP/s."""
    return 1e3 * max(num_bytes / bandwidth, num_flops / peak)
