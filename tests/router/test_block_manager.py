"""Paged KV block bookkeeping: every block is either free or held by exactly one sequence."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.router.block_manager import BlockManager, blocks_for, num_blocks_for_budget
from moeserve.router.sequence import SamplingParams, Sequence

PARAMS = SamplingParams(max_tokens=8)


def _seq(n: int, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(n)), PARAMS)


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 4) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert blocks_for(7, 1) == 7


def test_budget_sizing():
    # 1 MiB at 256 bytes per token, 16 tokens per block -> 256 blocks; partial blocks do not count
    assert num_blocks_for_budget(1 << 20, 256, 16) == 256
    assert num_blocks_for_budget((1 << 20) - 1, 256, 16) == 255
    assert num_blocks_for_budget(100, 256, 16) == 0
    assert num_blocks_for_budget(-5, 256, 16) == 0
    with pytest.raises(ValueError, match="bytes_per_token"):
        num_blocks_for_budget(1 << 20, 0, 16)


def test_allocate_append_free_cycle():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _seq(5, "a")
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 2 and bm.num_used_blocks == 2
    for _ in range(3):  # tokens 6..8 still fit the second block
        a.token_ids.append(0)
        assert bm.can_append(a)
        bm.append(a)
        assert len(a.block_table) == 2
    a.token_ids.append(0)  # token 9 needs a third block
    bm.append(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    b = _seq(5, "b")
    assert not bm.can_allocate(b)
    with pytest.raises(RuntimeError, match="needs 2 blocks"):
        bm.allocate(b)
    a.num_computed_tokens = 9
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0 and bm.num_free_blocks == 4
    bm.allocate(b)
    with pytest.raises(RuntimeError, match="already holds"):
        bm.allocate(b)


def test_append_refused_when_full():
    bm = BlockManager(num_blocks=1, block_size=2)
    s = _seq(2)
    bm.allocate(s)
    s.token_ids.append(0)
    assert not bm.can_append(s)
    with pytest.raises(RuntimeError, match="more blocks"):
        bm.append(s)


@settings(max_examples=200, deadline=None)
@given(
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 5),
    ops=st.lists(st.tuples(st.sampled_from(["alloc", "grow", "free"]), st.integers(0, 5), st.integers(1, 9)), max_size=60),
)
def test_blocks_are_conserved_and_never_shared(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size)
    seqs = {i: _seq(0, str(i)) for i in range(6)}
    held: dict[int, bool] = {i: False for i in seqs}
    for op, i, n in ops:
        s = seqs[i]
        if op == "alloc" and not held[i]:
            s.token_ids = list(range(n))
            if bm.can_allocate(s):
                bm.allocate(s)
                held[i] = True
            else:
                assert blocks_for(n, block_size) > bm.num_free_blocks
        elif op == "grow" and held[i]:
            s.token_ids.append(0)
            if bm.can_append(s):
                bm.append(s)
            else:
                s.token_ids.pop()
                assert bm.num_free_blocks == 0
        elif op == "free" and held[i]:
            bm.free(s)
            held[i] = False
        tables = [b for s in seqs.values() for b in s.block_table]
        assert len(tables) == len(set(tables)), "a block is held twice"
        assert set(tables).isdisjoint(bm.free_block_ids)
        assert len(tables) + bm.num_free_blocks == num_blocks
        for j, s in seqs.items():
            assert len(s.block_table) == (blocks_for(len(s), block_size) if held[j] else 0)
