"""RMSNorm, computed in float32 as the HF checkpoints were trained and evaluated."""

from __future__ import annotations

import torch
from torch import nn

from moeserve.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight multiplies after the cast back, as HF does it; one Triton kernel on CUDA
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a block's output added to the residual stream and the
        next norm taken, in one kernel on CUDA."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
