"""Facts about how Triton kernels run in this process, and how their buffers are allocated."""

from __future__ import annotations

import os

import torch

_poison = False

# Two programs per multiprocessor of an H100/H200 (132 of them): enough resident programs to hide memory
# latency in a kernel bound by its trips to memory (decode attention's splits, the small combine).
TWO_PROGRAMS_PER_SM = 264


def interpreting() -> bool:
    """True under the Triton CPU interpreter (TRITON_INTERPRET=1), where kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_poison(enabled: bool) -> bool:
    """Fill every buffer the kernel wrappers allocate with garbage (NaN, or -7777777 for integers), so
    tests catch anything a kernel leaves unwritten; returns the previous setting."""
    global _poison
    previous, _poison = _poison, enabled
    return previous


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer when set_poison(True) is in force."""
    if not _poison:
        return torch.empty(*shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), device=device).to(dtype)
    return torch.full(shape, -7777777, dtype=dtype, device=device)
