"""Several projections of the same input as one GEMM.

At decode sizes every GEMM is a launch of a few microseconds whatever its size: Qwen3-30B-A3B's q, k
and v projections at batch 1 took three cuBLAS kernels of 5-7 us each on an H200. `FusedLinears`
concatenates the weights once into one [sum of outputs, in] tensor and makes each nn.Linear's
parameters views of its rows, so the checkpoint names, state_dict and memory stay as they were (no
second copy), and one F.linear gives every output. Used on CUDA only: on the CPU the separate GEMMs
are kept, so the CPU path's results stay bit-identical to the HF oracle's.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.kernels import ops

from .norm import PendingNorm


class FusedLinears:
    def __init__(self, linears: list[nn.Linear]):
        weights = [lin.weight for lin in linears]
        if len({(w.device, w.dtype, w.shape[1]) for w in weights}) != 1:
            raise ValueError("fused projections need one device, dtype and input width")
        if len({lin.bias is None for lin in linears}) != 1:
            raise ValueError("fused projections need biases on all or on none")
        self.sizes = [w.shape[0] for w in weights]
        # Ordinary tensors even when called under inference_mode (greedy_generate): the parameters
        # become views of these and must stay usable as they were.
        with torch.inference_mode(False):
            self.weight = torch.cat([w.detach() for w in weights])
            for lin, part in zip(linears, self.weight.split(self.sizes)):
                lin.weight.data = part
            self.bias = None
            if linears[0].bias is not None:
                self.bias = torch.cat([lin.bias.detach() for lin in linears])
                for lin, part in zip(linears, self.bias.split(self.sizes)):
                    lin.bias.data = part

    def __call__(self, x: torch.Tensor | PendingNorm) -> tuple[torch.Tensor, ...]:
        """Each projection's output, in the order given (views of one [.., sum of outputs] result). A
        PendingNorm's add and norm may run in the same launch."""
        y = x.project(self.weight, self.bias) if isinstance(x, PendingNorm) else ops.linear(x, self.weight, self.bias)
        return y.split(self.sizes, dim=-1)


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) through ops.linear: at decode sizes on a GPU a Triton GEMV, else F.linear as nn.Linear."""
    return ops.linear(x, linear.weight, linear.bias)


def fuse(linears: list[nn.Linear]) -> FusedLinears | None:
    """FusedLinears over `linears` when their weights are on a CUDA device, else None."""
    return FusedLinears(linears) if linears[0].weight.is_cuda else None
