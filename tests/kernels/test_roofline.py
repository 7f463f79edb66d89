"""The physical-limit arithmetic of the kernel benchmark."""

import pytest

from moeserve.kernels.roofline import SHAPES, ExpertShape, expert_bytes, flops, limit_ms, min_bytes


def test_expert_bytes_by_format():
    s = SHAPES["qwen3-30b-a3b"]
    assert expert_bytes(s, "bf16") == 3 * 2048 * 768 * 2
    # e4m3 values plus one float32 per 128x128 block: gate and up 6x16 blocks each, down 16x6
    assert expert_bytes(s, "fp8") == 3 * 2048 * 768 + 4 * (2 * 6 * 16 + 16 * 6)
    assert expert_bytes(s, "int8") == 3 * 2048 * 768 + 4 * (2 * 768 + 2048)
    with pytest.raises(ValueError, match="quant"):
        expert_bytes(s, "fp4")


def test_limit_is_the_larger_of_memory_and_compute():
    s = ExpertShape("t", 1024, 512, 4, 2)
    b = min_bytes(s, 10, 3, "bf16")
    assert b == 3 * 3 * 1024 * 512 * 2 + 2 * 10 * 1024 * 2 + 10 * 2 * 12
    f = flops(s, 20)
    assert f == 2 * 20 * 3 * 1024 * 512
    assert limit_ms(b, f, bandwidth=1e12, peak=1e18) == pytest.approx(1e3 * b / 1e12)
    assert limit_ms(b, f, bandwidth=1e18, peak=1e9) == pytest.approx(1e3 * f / 1e9)


def test_issue_reference_point():
    """The issue's H100 numbers: qwen3 at one token moves 8 experts, ~25 us at 2.96 TB/s."""
    s = SHAPES["qwen3-30b-a3b"]
    ms = limit_ms(min_bytes(s, 1, 8, "bf16"), flops(s, 8), 2.96e12, 749e12)
    assert 0.024 < ms < 0.027
