"""Programmatic dependent launch (Hopper and later): a kernel may be put on the GPU while the one
before it in the stream is still finishing, and waits inside for that kernel's writes.

A decode step at batch 1 is some 600 small launches (about 13 per layer); between two dependent
launches the GPU idles while the first kernel drains and the next one's programs are placed and set
up. Each Triton kernel here starts with `enter(PDL)`: with PDL on it waits for the previous kernel
(griddepcontrol.wait: all of its memory operations complete and visible) before touching any
memory, then lets the next kernel be launched at once. Launched with `launch_pdl=True`, that wait is
what orders it after its predecessor; launched plainly (PDL off, another kernel library, or the
CPU interpreter), the stream orders it as usual and `enter` does nothing.

The chain stays safe because every PDL kernel waits before it writes, and lets the next one launch
only after its wait: when kernel N+1 starts, kernel N-1 and everything before it have completed.
So before its wait a kernel may read weights (no step writes them) and anything kernel N does not
write (gemv.py's weight rows; moe_gemv.py's down GEMV reads the gating's expert ids and routing
weights, two launches back, and its weights). A plainly launched kernel never lets the next one
start before it completes. Captured in a CUDA graph, the launches become programmatic edges and
replay the same way.

MOESERVE_PDL=0 launches every kernel plainly (for measuring what it brings, or ruling it out).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .launch import interpreting

SWITCHED_OFF = os.environ.get("MOESERVE_PDL", "1") == "0"  # read once: enabled() runs at every launch


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with programmatic dependent launch."""
    if SWITCHED_OFF or not t.is_cuda or interpreting():
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


@triton.jit
def enter(PDL: tl.constexpr):
    """First statement of every kernel: with PDL, wait for the previous kernel, then let the next
    one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_args(t: torch.Tensor) -> dict:
    """The keyword arguments that launch a kernel of this package for tensors on t's device."""
    on = enabled(t)
    return {"PDL": on, "launch_pdl": on}
