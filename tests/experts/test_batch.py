"""The wire form of expert batches keeps every bit, bfloat16 and fp8 included."""

from __future__ import annotations

import pytest
import torch

from moeserve.experts.batch import ExpertBatch, tensor_from_wire, tensor_to_wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float8_e4m3fn])
def test_tensor_round_trip_is_bitwise(dtype):
    t = (torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    back = tensor_from_wire(tensor_to_wire(t[:, 1:6]))
    assert back.dtype == dtype and back.shape == (5, 5)
    assert torch.equal(back.view(torch.uint8), t[:, 1:6].contiguous().view(torch.uint8))


def test_batch_round_trip_and_shape_check():
    b = ExpertBatch(3, torch.randn(4, 8), torch.tensor([[0], [1], [-1], [2]]), torch.rand(4, 1))
    back = ExpertBatch.from_wire(b.to_wire())
    assert back.layer_id == 3 and back.num_rows == 4
    assert torch.equal(back.rows, b.rows) and torch.equal(back.local_ids, b.local_ids)
    with pytest.raises(ValueError, match=r"must agree on \[N, k\]"):
        ExpertBatch(0, torch.randn(4, 8), torch.zeros(3, 1, dtype=torch.long), torch.rand(3, 1))
