"""Rotary position embeddings: plain RoPE and YaRN, in the halves or interleaved-pairs layout.

YaRN follows the DeepSeek / HF formulation: blended inverse frequencies, cos/sin scaled by the
attention factor (mscale / mscale_all_dim for DeepSeek), and `softmax_mscale` for MLA's softmax scale.
"""

from __future__ import annotations

import math

import torch

from moeserve.kernels import ops

from ..config import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_mscale(rope: RopeConfig) -> float:
    """Extra factor on DeepSeek's softmax scale (applied squared): YaRN with mscale_all_dim only."""
    if rope.type != "yarn" or not rope.mscale_all_dim:
        return 1.0
    return _yarn_mscale(rope.factor, rope.mscale_all_dim)


def _yarn_inv_freq(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp below would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_share = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding:
    """Computes cos/sin for positions and rotates query/key heads [T, heads, dim]."""

    def __init__(self, dim: int, rope: RopeConfig):
        self.dim = dim
        self.interleaved = rope.interleaved
        if rope.type == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(dim, rope)
        else:
            inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
            self.attention_factor = 1.0
        # Built on the CPU explicitly: models are constructed under torch.device("meta") for loading.
        self._inv_freq = {torch.device("cpu"): inv_freq}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, dim/2] in float32 for int64 positions [T]."""
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        freqs = positions.float()[:, None] * self._inv_freq[device][None, :]
        if self.attention_factor == 1.0:
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, dim]; the interleaved layout stays interleaved (q.k is unchanged by it)."""
        return ops.apply_rotary(x, cos, sin, self.interleaved)
