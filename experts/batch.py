"""The unit of work sent to an expert group, and its wire form.

On the wire tensors travel as numpy arrays: Ray stores those without pickling the data and reads them
back zero-copy, which measured 6x cheaper than pickled torch tensors for a 4 MiB batch (see
benchmarks/bench_transport.py). bfloat16, which numpy lacks, travels as its int16 bit pattern.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

_BIT_VIEWS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}
# The dtypes a batch's tensors may have on any transport's wire (experts/channel.py numbers them in this order).
WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
               torch.float8_e4m3fn, torch.float8_e5m2)
_DTYPES = {str(dt): dt for dt in WIRE_DTYPES}

WireTensor = tuple[np.ndarray, str]


def tensor_to_wire(t: torch.Tensor) -> WireTensor:
    """A CPU numpy array carrying `t`'s bits, and `t`'s dtype name."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    view = _BIT_VIEWS.get(t.dtype)
    return (t.view(view) if view is not None else t).numpy(), str(t.dtype)


def tensor_from_wire(w: WireTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    arr, dtype_name = w
    dtype = _DTYPES[dtype_name]
    with warnings.catch_warnings():  # arrays read zero-copy from the object store are read-only; we never write them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    if dtype in _BIT_VIEWS:
        t = t.view(dtype)
    return t.to(device, non_blocking=True) if torch.device(device).type != "cpu" else t


@dataclass(slots=True)
class ExpertBatch:
    """Rows for one group at one MoE layer: rows [N, H], local expert ids [N, k] (-1: none), weights [N, k] float32."""

    layer_id: int
    rows: torch.Tensor
    local_ids: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        n = self.rows.shape[0]
        if self.local_ids.shape[0] != n or self.weights.shape != self.local_ids.shape:
            raise ValueError(
                f"ExpertBatch: rows {tuple(self.rows.shape)}, local_ids {tuple(self.local_ids.shape)} and "
                f"weights {tuple(self.weights.shape)} must agree on [N, k]"
            )

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    def to_wire(self) -> tuple:
        return (self.layer_id, tensor_to_wire(self.rows), tensor_to_wire(self.local_ids), tensor_to_wire(self.weights))

    @classmethod
    def from_wire(cls, wire: tuple, device: torch.device | str = "cpu") -> "ExpertBatch":
        layer_id, rows, ids, weights = wire
        return cls(int(layer_id), tensor_from_wire(rows, device), tensor_from_wire(ids, device), tensor_from_wire(weights, device))
