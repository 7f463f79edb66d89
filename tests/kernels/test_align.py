"""The permutation kernel (moe_align_block_size) against reference.permute."""

import pytest
import torch
from kernel_cases import DEVICE, gpu, random_routing

from moeserve.kernels import align
from moeserve.kernels import reference as ref


def check_alignment(ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    a = align.align_block_size(ids, num_experts, block_m)
    s = ids.numel()
    flat = ids.reshape(-1).cpu()
    order, counts, _ = ref.permute(ids.cpu(), num_experts)
    sorted_ids, block_expert = a.sorted_ids.cpu().long(), a.block_expert.cpu().long()
    n = int(a.num_padded)
    assert a.counts.cpu().tolist() == counts.tolist()
    assert n == sum(-(-c // block_m) * block_m for c in counts.tolist())
    assert n <= sorted_ids.numel() == block_expert.numel() * block_m
    # Real slots in expert order, stable (the reference order); everything else is the sentinel S.
    used = sorted_ids[:n]
    assert used[used != s].tolist() == order.tolist()
    assert ((used >= 0) & (used <= s)).all()
    assert (sorted_ids[n:] == s).all()
    # Every used block belongs to one expert and holds only its slots; later blocks say -1.
    nb = n // block_m
    for b in range(nb):
        blk = sorted_ids[b * block_m:(b + 1) * block_m]
        real = blk[blk != s]
        assert len(real) > 0 and (flat[real] == block_expert[b]).all()
    assert (block_expert[nb:] == -1).all()


CASES = [  # (T, k, E, block_m, drop)
    (1, 2, 8, 16, 0.0),  # one token
    (1, 8, 128, 16, 0.0),  # decode on a 128-expert layer: 8 runs, 120 experts untouched
    (13, 3, 6, 16, 0.2),  # slots held elsewhere (-1)
    (7, 8, 8, 16, 0.0),  # top-k == number of experts
    (64, 8, 128, 32, 0.0),
    (300, 6, 64, 64, 0.1),
    (700, 6, 16, 64, 0.1),  # > 4096 slots: the counting launch first
    (1500, 8, 32, 64, 0.1),  # 3 chunks of slots placed by separate programs, one expert's run across them
    (0, 4, 8, 16, 0.0),  # no tokens
]


@pytest.mark.parametrize("t,k,e,block_m,drop", CASES)
def test_align_matches_reference(t, k, e, block_m, drop, gen):
    ids, _ = random_routing(t, e, k, gen, drop=drop)
    check_alignment(ids, e, block_m)


def test_align_every_token_to_one_expert():
    check_alignment(torch.full((50, 1), 3, device=DEVICE), 8, 16)
    check_alignment(torch.full((4500, 1), 5, device=DEVICE), 8, 64)  # counting launch first


def test_align_nothing_held_here():
    check_alignment(torch.full((5, 2), -1, device=DEVICE), 8, 16)


def test_align_ids_out_of_range_are_not_held():
    ids = torch.tensor([[0, 9], [-1, 2], [9, 9]], device=DEVICE)  # 9 >= E
    check_alignment(ids, 8, 16)


@gpu
@pytest.mark.parametrize("t,k,e", [(1, 8, 256), (64, 8, 128), (4096, 8, 128), (4096, 8, 256), (4096, 2, 8)])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_real_shapes(t, k, e, block_m, gen):
    ids, _ = random_routing(t, e, k, gen, drop=0.05)
    check_alignment(ids, e, block_m)
