"""Prefix-affine routing of the trunk pool (router/trunk_pool.py's PrefixAffinity), as pure bookkeeping."""

from moeserve.router.trunk_pool import PrefixAffinity

SYSTEM = list(range(100, 140))  # a 40-token system prompt: two whole blocks of 16, and 8 tokens more


def test_keys_cover_the_whole_blocks_before_the_last_token():
    a = PrefixAffinity(block_size=16)
    assert a.keys(list(range(16))) == []  # the one block holds the last token: nothing the cache could match
    assert len(a.keys(list(range(17)))) == 1 and len(a.keys(SYSTEM)) == 2
    assert a.keys(SYSTEM + [1])[:2] == a.keys(SYSTEM + [2])[:2] == a.keys(SYSTEM)
    assert a.keys([7] + SYSTEM)[0] != a.keys(SYSTEM)[0]
    # a block's key depends on every block before it
    assert a.keys([0] * 16 + SYSTEM[16:32] + [1])[1] != a.keys(SYSTEM)[1]


def test_a_shared_prefix_goes_where_it_went_unless_that_member_is_much_busier():
    a = PrefixAffinity(block_size=16)
    keys = a.keys(SYSTEM + [1, 2, 3])
    assert a.choose(keys, {0: 0, 1: 0}) is None  # never seen
    a.record(keys, 1)
    other = a.keys(SYSTEM + [9, 9])
    assert a.choose(other, {0: 0, 1: 0}) == 1  # shares the system prompt's two blocks
    assert a.choose(other, {0: 0, 1: PrefixAffinity.SLACK}) == 1
    assert a.choose(other, {0: 0, 1: PrefixAffinity.SLACK + 1}) is None  # too much busier: least busy instead
    assert a.choose(other, {0: 40, 1: 40 + 20}) == 1  # within half the least busy's load
    assert a.choose(other, {0: 40, 1: 40 + 21}) is None
    assert a.choose(other, {0: 0}) is None  # its member no longer serves


def test_the_longest_known_prefix_wins():
    a = PrefixAffinity(block_size=4)
    a.record(a.keys([1, 2, 3, 4, 0]), 0)  # one block
    a.record(a.keys([1, 2, 3, 4, 5, 6, 7, 8, 0]), 1)  # the same block and one more: its owner is now 1 as well
    assert a.choose(a.keys([1, 2, 3, 4, 9]), {0: 0, 1: 0}) == 1
    a.record(a.keys([1, 2, 3, 4, 0]), 0)
    assert a.choose(a.keys([1, 2, 3, 4, 5, 6, 7, 8, 9]), {0: 0, 1: 0}) == 1  # two blocks known at 1, one at 0
    assert a.choose(a.keys([1, 2, 3, 4, 9]), {0: 0, 1: 0}) == 0


def test_a_conversation_follows_its_member():
    a = PrefixAffinity(block_size=8)
    turn = SYSTEM + [5, 6, 7]
    a.record(a.keys(turn), 3)
    for _ in range(4):  # each turn's prompt: the previous prompt, its reply, the next message
        turn = turn + list(range(20)) + [1, 2]
        assert a.choose(a.keys(turn), {2: 0, 3: 1}) == 3
        a.record(a.keys(turn), 3)


def test_only_the_most_recent_prefixes_are_remembered():
    a = PrefixAffinity(block_size=2, capacity=3)
    for i in range(5):
        a.record(a.keys([i, i, 0]), i)
    assert a.choose(a.keys([0, 0, 1]), {0: 0, 4: 0}) is None and a.choose(a.keys([4, 4, 1]), {0: 0, 4: 0}) == 4
    assert len(a._owner) == 3
