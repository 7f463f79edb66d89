"""The SwiGLU MLP of dense layers and shared experts (HF names gate_proj, up_proj, down_proj)."""

from __future__ import annotations

import torch
from torch import nn

from moeserve.kernels import ops

from .fused_linear import fuse, project


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up = None  # gate and up as one GEMM once fuse_projections ran (CUDA)

    def fuse_projections(self) -> None:
        if self.gate_up is None:
            self.gate_up = fuse([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return project(self.down_proj, ops.silu_mul(gate, up))
