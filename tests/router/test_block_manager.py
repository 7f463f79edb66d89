"""Paged KV block bookkeeping: every block is free or held; a block is shared only as a cached prefix block."""

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
        assert set(tables).isdisjoint(bm.free_blocks())
        assert len(tables) + bm.num_free_blocks == num_blocks
        for j, s in seqs.items():
            assert len(s.block_table) == (blocks_for(len(s), block_size) if held[j] else 0)


def _computed(bm: BlockManager, seq: Sequence) -> None:
    """As after a step that read all of seq's tokens."""
    seq.num_computed_tokens = len(seq)
    bm.register(seq)


def test_cached_blocks_are_taken_last_and_least_recently_released_first():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = Sequence("a", [1, 2, 3, 4, 5], PARAMS)  # blocks [1 2] [3 4] [5]: two full, cached once computed
    bm.allocate(a)
    _computed(bm, a)
    assert bm.num_cached_blocks == 2
    first, second, last = a.block_table
    bm.free(a)
    assert bm.num_free_blocks == 8 and bm.free_blocks()[-2:] == [second, first]  # later blocks go first
    b = Sequence("b", [9] * 14, PARAMS)  # 7 blocks: the 6 holding nothing (a's last among them), then a's second
    bm.allocate(b)
    assert second in b.block_table and first not in b.block_table and bm.num_cached_blocks == 1
    bm.free(b)  # never computed: nothing of it is cached
    c = Sequence("c", [1, 2, 3, 4, 6], PARAMS)  # [1 2] still cached, [3 4] was taken
    bm.allocate(c)
    assert c.block_table[0] == first and c.num_computed_tokens == 2 and c.num_cached_blocks == 1


def test_same_tokens_after_a_different_prefix_do_not_match():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = Sequence("a", [1, 2, 3, 4, 0], PARAMS)
    bm.allocate(a)
    _computed(bm, a)
    b = Sequence("b", [7, 8, 3, 4, 0], PARAMS)  # its second block's tokens equal a's, after another first block
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)
    _computed(bm, b)
    assert bm.num_cached_blocks == 4


def test_a_block_computed_twice_is_cached_once():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = Sequence("a", [1, 2, 3], PARAMS), Sequence("b", [1, 2, 4], PARAMS)
    bm.allocate(a)
    bm.allocate(b)  # in the same step: nothing cached yet, so b computes [1 2] too
    _computed(bm, a)
    _computed(bm, b)
    assert bm.num_cached_blocks == 1
    bm.free(a)
    bm.free(b)
    c = Sequence("c", [1, 2, 5], PARAMS)
    bm.allocate(c)
    assert c.num_computed_tokens == 2 and bm.prefix_hit_tokens == 2


@settings(max_examples=200, deadline=None)
@given(
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 4),
    shared=st.lists(st.integers(0, 3), min_size=8, max_size=8),
    ops=st.lists(st.tuples(st.sampled_from(["alloc", "compute", "free", "alloc", "compute", "grow"]), st.integers(0, 2),
                           st.integers(0, 8), st.lists(st.integers(0, 3), min_size=1, max_size=4)), min_size=4, max_size=60),
)
def test_shared_blocks_hold_the_same_tokens_and_are_counted_once(num_blocks, block_size, shared, ops):
    """Prompts begin with part of one shared prefix. Whatever the order of allocations, steps and frees: each
    block is free or held, never both; a block two sequences hold lies at the same index of both tables with the
    same tokens in it; and what a sequence was given as computed is whole blocks it did not have to write."""
    bm = BlockManager(num_blocks, block_size)
    seqs = {i: Sequence(str(i), [0], PARAMS) for i in range(3)}
    held: dict[int, bool] = {i: False for i in seqs}
    for op, i, p, tokens in ops:
        s = seqs[i]
        if op == "alloc" and not held[i]:
            s.token_ids = shared[:p] + tokens
            if bm.can_allocate(s):
                bm.allocate(s)
                held[i] = True
                assert s.num_computed_tokens % block_size == 0 and s.num_computed_tokens < len(s)
            else:
                assert blocks_for(len(s), block_size) > bm.num_free_blocks - bm.num_cached_blocks
        elif op == "grow" and held[i]:
            s.token_ids.append(tokens[0])
            if bm.can_append(s):
                bm.append(s)
            else:
                s.token_ids.pop()
        elif op == "compute" and held[i]:
            _computed(bm, s)
        elif op == "free" and held[i]:
            bm.free(s)
            held[i] = False
        where: dict[int, tuple[int, list[int]]] = {}
        for s in seqs.values():
            for k, b in enumerate(s.block_table):
                content = s.token_ids[k * block_size:(k + 1) * block_size]
                if b in where:
                    assert where[b] == (k, content), "a block shared at different places or with different tokens"
                where[b] = (k, content)
        assert set(where).isdisjoint(bm.free_blocks()) and len(where) + bm.num_free_blocks == num_blocks
        assert sorted(set(bm.free_blocks())) == sorted(bm.free_blocks())
