"""RMSNorm, computed in float32 as the HF checkpoints were trained and evaluated; and PendingNorm, a
norm the projection after it may take in its own launch."""

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


class PendingNorm:
    """norm(x + residual), not computed yet: what a decoder layer hands its attention, whose first
    projection may fold the add and the norm into its own launch (project: ops.add_rms_norm_linear,
    one Triton launch at one row on a GPU, where the norm alone is a launch of about 1.7 us). Whatever
    reads it as a tensor gets norm.add_forward's result (tensor()). total() is x + residual, the
    residual stream's next value, however the norm was taken."""

    def __init__(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm):
        self.x, self.residual, self.norm = x, residual, norm
        self._h: torch.Tensor | None = None
        self._total: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def tensor(self) -> torch.Tensor:
        if self._h is None:
            self._h, self._total = self.norm.add_forward(self.x, self.residual)
        return self._h

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """linear(tensor(), weight, bias), with the add and the norm in the same launch when they are not
        taken yet and the kernel takes the call."""
        if self._h is not None:
            return ops.linear(self._h, weight, bias)
        y, self._total = ops.add_rms_norm_linear(self.x, self.residual, self.norm.weight, self.norm.eps, weight, bias)
        return y

    def total(self) -> torch.Tensor:
        if self._total is None:
            self.tensor()
        return self._total


def materialize(x: torch.Tensor | PendingNorm) -> torch.Tensor:
    """x itself, or a PendingNorm's normed tensor."""
    return x.tensor() if isinstance(x, PendingNorm) else x
