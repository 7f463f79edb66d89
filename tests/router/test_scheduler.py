"""The continuous-batching scheduler, driven against a simulated paged KV cache.

The simulation writes each scheduled token into a dict keyed by its slot (through the same
`flatten` the model runner uses) and, whenever a sequence samples, reads its whole context back
through its block table: that context must be exactly the sequence's tokens. The "model" is a
pure function of the context, so every request's output must equal its output served alone,
whatever the batching, chunking, preemption, aborts and prefix caching (blocks shared by sequences
whose tokens begin alike) did.
"""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.router.block_manager import BlockManager, blocks_for
from moeserve.router.errors import QueueFullError
from moeserve.router.model_runner import flatten
from moeserve.router.scheduler import Scheduler
from moeserve.router.sequence import SamplingParams, Sequence, SequenceStatus


def next_token(context: list[int]) -> int:
    return sum((i + 1) * t for i, t in enumerate(context)) % 50


def alone(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class Sim:
    def __init__(self, num_blocks, block_size, max_num_seqs, budget, max_queued=10_000, prefill_hold_s=0.0,
                 prefix_caching=True):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.now = 0.0  # the scheduler's clock (seconds), moved by the test
        self.sched = Scheduler(self.bm, max_num_seqs, budget, max_queued, prefill_hold_s, clock=lambda: self.now)
        self.budget, self.max_num_seqs, self.block_size = budget, max_num_seqs, block_size
        self.cache: dict[int, int] = {}
        self.seqs: dict[str, Sequence] = {}

    def add(self, rid, prompt, max_tokens, priority=0):
        seq = Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens, priority=priority), self.now)
        self.sched.add(seq)
        self.seqs[rid] = seq
        return seq

    def abort(self, rid):
        seq = self.seqs[rid]
        others = {b for s in self.seqs.values() if s is not seq for b in s.block_table}
        held = len(set(seq.block_table) - others)  # blocks no other sequence shares
        used = self.bm.num_used_blocks
        self.sched.finish(seq, "cancelled")
        assert self.bm.num_used_blocks == used - held  # freed at once

    def step(self):
        before = {s.request_id: (s.status, s.num_uncomputed_tokens) for s in self.seqs.values()}
        batch = self.sched.schedule()
        self.check(batch, before)
        flat = flatten(batch, self.block_size)
        holders = Counter(b for s in self.seqs.values() for b in s.block_table)
        for slot, token in zip(flat.slot_mapping, flat.input_ids):
            assert holders[slot // self.block_size] == 1, f"slot {slot} is written while its block is shared"
            self.cache[slot] = token
        sampled = []
        for seq, samples in zip(batch.seqs, batch.sample_flags):
            if samples:
                bs, table = self.block_size, seq.block_table
                context = [self.cache[table[p // bs] * bs + p % bs] for p in range(len(seq))]
                assert context == seq.token_ids, f"{seq.request_id}: KV read back does not match its tokens"
                sampled.append(next_token(context))
        assert len(sampled) == len(flat.sample_rows)
        for seq in self.sched.postprocess(batch, sampled):
            if seq.num_completion_tokens >= seq.params.max_tokens:
                self.sched.finish(seq, "length")
        return batch

    def check(self, batch, before):
        sched, bm = self.sched, self.bm
        assert batch.num_tokens <= self.budget
        assert len(batch.seqs) <= self.max_num_seqs and len(sched.running) <= self.max_num_seqs
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        # decodes of sequences already running come before any prefill chunk
        kinds = ["decode" if before[s.request_id] == (SequenceStatus.RUNNING, 1) else "prefill" for s in batch.seqs]
        assert kinds == sorted(kinds), kinds
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.status is SequenceStatus.RUNNING
            assert 1 <= n <= seq.num_uncomputed_tokens
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens + n
        for seq in batch.preempted:
            assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
        if batch.preempted:  # no admission in a step that had to preempt
            assert all(before[s.request_id][0] is SequenceStatus.RUNNING for s in batch.seqs)
        held = {b for s in self.seqs.values() for b in s.block_table}
        assert len(held) + bm.num_free_blocks == bm.num_blocks and held.isdisjoint(bm.free_blocks())
        for s in sched.running:
            assert len(s.block_table) == blocks_for(len(s), self.block_size)
        assert batch or not sched.has_unfinished(), "work left but nothing scheduled"


def test_decodes_first_then_prefill_chunks_fill_the_budget():
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=4, budget=8)
    a = sim.add("a", [1, 2, 3], 5)
    assert sim.step().num_new_tokens == [3]  # a's whole prompt
    b = sim.add("b", list(range(20)), 2)
    batch = sim.step()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 7] and batch.sample_flags == [True, False]
    batch = sim.step()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 7]
    batch = sim.step()  # b's last 6 prompt tokens complete its prefill: it samples
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 6] and batch.sample_flags == [True, True]
    assert sim.step().num_new_tokens == [1, 1]


def test_decodes_sit_out_one_step_when_that_lets_every_waiting_prompt_in():
    """Deferred only when the decodes alone would push the last prompt tokens into another step, at
    most once in DEFER_EVERY steps; the decodes keep their blocks meanwhile."""
    from moeserve.router.scheduler import DEFER_EVERY

    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=6, budget=8)
    a, b = sim.add("a", [1] * 4, 16), sim.add("b", [2] * 4, 16)
    assert sim.step().num_new_tokens == [4, 4]
    c, d = sim.add("c", [3] * 4, 16), sim.add("d", [4] * 4, 16)
    batch = sim.step()  # 2 decodes + 8 prompt tokens > 8: the decodes wait, c and d are read whole
    assert batch.seqs == [c, d] and batch.num_new_tokens == [4, 4] and sim.sched.decodes_deferred
    assert sim.step().num_new_tokens == [1, 1, 1, 1]  # decodes alone
    e, f = sim.add("e", [5] * 4, 16), sim.add("f", [6] * 4, 16)
    batch = sim.step()  # the same situation within DEFER_EVERY steps: decodes first, e whole, f waits
    assert batch.seqs == [a, b, c, d, e] and batch.num_new_tokens == [1, 1, 1, 1, 4]
    assert not sim.sched.decodes_deferred
    batch = sim.step()
    assert batch.seqs == [a, b, c, d, e, f] and batch.num_new_tokens == [1, 1, 1, 1, 1, 3]
    for _ in range(DEFER_EVERY):
        sim.step()
    sim.add("g", [7] * 4, 4)  # past the cool-down, but 6 sequences run: g has no slot
    assert sim.step().seqs == [a, b, c, d, e, f] and not sim.sched.decodes_deferred


def test_a_deferral_counts_against_the_requests_it_deferred_only():
    """Requests deferred and since finished do not hold back the next burst's deferral: a benchmark's
    warm-up wave deferred its decodes, and the measured wave, five steps later, ran an extra mixed step."""
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=6, budget=8)
    a, b = sim.add("a", [1] * 4, 2), sim.add("b", [2] * 4, 2)
    assert sim.step().num_new_tokens == [4, 4]
    c, d = sim.add("c", [3] * 4, 16), sim.add("d", [4] * 4, 16)
    assert sim.step().seqs == [c, d] and sim.sched.decodes_deferred  # a and b sit out
    batch = sim.step()  # a and b take their second (last) token
    assert batch.seqs == [a, b, c, d] and not sim.sched.running.count(a) and not sim.sched.running.count(b)
    e, f = sim.add("e", [5] * 4, 16), sim.add("f", [6] * 4, 16)
    batch = sim.step()  # c and d were never left out: they sit this one out, e and f are read whole
    assert batch.seqs == [e, f] and batch.num_new_tokens == [4, 4] and sim.sched.decodes_deferred
    assert sim.step().seqs == [c, d, e, f]


def test_prompts_arriving_while_decodes_run_are_held_until_the_oldest_has_waited():
    """With a prefill hold, the steps stay decodes alone (CUDA graphs on a GPU) while newcomers wait,
    then one step takes every held prompt; the burst wait is not asked to wait for them meanwhile."""
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, prefill_hold_s=0.05)
    a = sim.add("a", [1] * 4, 20)
    assert sim.step().seqs == [a]  # nothing decodes yet: admitted at once
    sim.now = 1.0
    b = sim.add("b", [2] * 4, 20)
    sim.now = 1.02
    c = sim.add("c", [3] * 5, 20)
    for t in (1.02, 1.03, 1.049):
        sim.now = t
        assert sim.sched.admissible_arrivals() is None
        batch = sim.step()
        assert batch.seqs == [a] and batch.num_new_tokens == [1]
    sim.now = 1.05  # b has waited the whole hold: b and c go in together
    assert sim.sched.admissible_arrivals() == (1.0, 1.02)
    batch = sim.step()
    assert batch.seqs == [a, b, c] and batch.num_new_tokens == [1, 4, 5]
    assert sim.step().num_new_tokens == [1, 1, 1]


@pytest.mark.parametrize("case", ["no decode runs", "slots full", "budget full", "chunk running"])
def test_held_prompts_go_in_at_once_when_waiting_gains_nothing(case):
    """No hold when nothing decodes, when the newcomers already fill the step's free sequence slots or
    its token budget, or when the step reads a prompt chunk anyway (it runs eagerly)."""
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=3, budget=12, prefill_hold_s=10.0)
    if case == "no decode runs":
        a = sim.add("a", [1] * 4, 4)
        assert sim.step().seqs == [a]
        return
    a = sim.add("a", [1] * 4, 20)
    sim.step()
    if case == "slots full":
        b, c = sim.add("b", [2] * 2, 4), sim.add("c", [3] * 2, 4)  # 2 waiting, 2 free slots
        assert sim.step().seqs == [a, b, c]
    elif case == "budget full":
        b = sim.add("b", [2] * 11, 4)  # 1 decode + 11 prompt tokens = the budget of 12
        assert sim.step().seqs == [a, b]
    else:
        b = sim.add("b", [2] * 20, 4)  # read in chunks: 11 tokens now, the rest next step
        assert sim.step().num_new_tokens == [1, 11]
        c = sim.add("c", [3] * 2, 4)
        batch = sim.step()  # b's last 9 tokens make this step eager: c joins it
        assert batch.seqs == [a, b, c] and batch.num_new_tokens == [1, 9, 2]


def test_sequence_cap_and_fcfs_admission():
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, budget=64)
    for i in range(4):
        sim.add(f"r{i}", [i + 1] * 3, 4)
    batch = sim.step()
    assert [s.request_id for s in batch.seqs] == ["r0", "r1"] and len(sim.sched.waiting) == 2


def test_admissible_arrivals_only_while_a_newcomer_could_join_the_next_step():
    """What AsyncEngine's burst wait looks at: the waiting requests' arrival span, and only while the
    next step has a free sequence slot and token budget for one more prompt."""
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=4, budget=16)

    def arrive(rid, prompt_len, at):
        sim.seqs[rid] = Sequence(rid, [7] * prompt_len, SamplingParams(max_tokens=4), at)
        sim.sched.add(sim.seqs[rid])

    assert sim.sched.admissible_arrivals() is None  # nothing waits
    arrive("a", 4, 10.0)
    arrive("b", 4, 10.5)
    assert sim.sched.admissible_arrivals() == (10.0, 10.5)
    arrive("c", 4, 11.0)
    arrive("d", 4, 11.2)
    assert sim.sched.admissible_arrivals() is None  # four sequences fill max_num_seqs: no room for a fifth
    assert sim.step().num_new_tokens == [4, 4, 4, 4]
    sim.abort("c")
    sim.abort("d")
    arrive("e", 13, 12.0)
    assert sim.sched.admissible_arrivals() == (12.0, 12.0)  # 2 decodes + 13 prompt tokens: room for one more
    arrive("f", 1, 12.5)
    assert sim.sched.admissible_arrivals() is None  # 2 + 13 + 1 tokens fill the budget of 16
    sim.step()
    sim.step()
    assert not sim.sched.waiting and sim.sched.admissible_arrivals() is None


def test_admission_by_kv_capacity_does_not_skip_the_head():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=4, budget=64)
    sim.add("a", [1] * 8, 4)  # 2 blocks
    sim.step()
    big = sim.add("big", [2] * 12, 1)  # 3 blocks: does not fit the 2 free
    sim.add("small", [3], 1)  # fits, but must not overtake the head of the queue
    batch = sim.step()
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert list(sim.sched.waiting)[0] is big


def test_preemption_takes_the_newest_and_recomputes_it():
    sim = Sim(num_blocks=4, block_size=2, max_num_seqs=4, budget=64)
    a = sim.add("a", [1, 2, 3, 4], 4)
    b = sim.add("b", [5, 6, 7, 8], 4)
    assert sim.step().seqs == [a, b]  # both prompts: all 4 blocks in use
    batch = sim.step()  # a's new token needs a fifth block: b (newest) is preempted
    assert batch.preempted == [b] and batch.seqs == [a]
    assert list(sim.sched.waiting) == [b] and b.num_completion_tokens == 1 and b.block_table == []
    assert sim.sched.num_preemptions == 1
    while sim.sched.has_unfinished():
        sim.step()
    assert a.completion_token_ids == alone([1, 2, 3, 4], 4)
    assert b.completion_token_ids == alone([5, 6, 7, 8], 4)


def test_a_shared_prefix_is_read_once():
    """A prompt that begins with another's whole computed blocks starts after them, sharing them; its last token's
    block is its own, even when every block of the prompt is cached."""
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=4, budget=64)
    prefix = list(range(1, 13))  # 3 blocks
    a = sim.add("a", prefix + [20, 21], 3)
    assert sim.step().num_new_tokens == [14]
    a_blocks = list(a.block_table)
    b = sim.add("b", prefix + [30], 3)
    batch = sim.step()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 1]  # b reads only its own token
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    c = sim.add("c", prefix, 2)  # the whole prompt cached: its last block is computed again, in a block of its own
    batch = sim.step()
    assert batch.seqs[-1] is c and batch.num_new_tokens[-1] == 4 and c.block_table[:2] == a_blocks[:2]
    assert c.block_table[2] != a_blocks[2]
    assert sim.bm.prefix_hit_tokens == 12 + 8 and sim.bm.prefix_queried_tokens == 14 + 13 + 12
    while sim.sched.has_unfinished():
        sim.step()
    for seq, prompt in ((a, prefix + [20, 21]), (b, prefix + [30]), (c, prefix)):
        assert seq.completion_token_ids == alone(prompt, seq.params.max_tokens)


def test_without_prefix_caching_nothing_is_shared():
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=4, budget=64, prefix_caching=False)
    a = sim.add("a", list(range(1, 13)) + [20], 3)
    sim.step()
    b = sim.add("b", list(range(1, 13)) + [30], 3)
    assert sim.step().num_new_tokens == [1, 13]
    assert not set(a.block_table) & set(b.block_table) and sim.bm.prefix_hit_tokens == 0


def test_a_preempted_sequence_finds_its_blocks_again():
    sim = Sim(num_blocks=5, block_size=2, max_num_seqs=4, budget=64)
    a = sim.add("a", [1, 2, 3, 4], 4)
    b = sim.add("b", [5, 6, 7, 8], 4)
    sim.step()
    batch = sim.step()  # a takes the last free block, b none: b is preempted; its two full blocks stay cached
    # (a's fourth block will take one of them: a sequence's later blocks go first, so [5 6] is left for b)
    assert batch.preempted == [b]
    while sim.sched.has_unfinished():
        sim.step()
    assert sim.bm.prefix_hit_tokens > 0  # b, admitted again, did not recompute all of its prompt
    assert a.completion_token_ids == alone([1, 2, 3, 4], 4) and b.completion_token_ids == alone([5, 6, 7, 8], 4)


def test_priority_orders_admission_and_picks_the_victim():
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=1, budget=64)
    low, high, mid, mid2 = (sim.add("low", [1], 2, priority=1), sim.add("high", [2], 2, priority=-5),
                            sim.add("mid", [3], 2), sim.add("mid2", [4], 2))
    order = []
    while sim.sched.has_unfinished():
        order += [s.request_id for s in sim.step().seqs if s.request_id not in order]
    assert order == ["high", "mid", "mid2", "low"]  # lowest first, arrival order among equals
    for seq in (low, high, mid, mid2):
        assert seq.completion_token_ids == alone(seq.token_ids[:1], 2)

    # b, a, c admitted one step apart (running in that order); when b's decode needs a block and none is free,
    # a goes (the highest priority value among those not yet scheduled this step), not c, the newest.
    sim = Sim(num_blocks=6, block_size=2, max_num_seqs=4, budget=64)
    b = sim.add("b", [5, 6, 7, 8], 8)
    sim.step()
    a = sim.add("a", [1, 2], 8, priority=1)
    sim.step()
    c = sim.add("c", [9, 10], 8)
    assert sim.step().seqs == [b, a, c] and sim.bm.num_free_blocks == 0
    batch = sim.step()
    assert batch.preempted == [a] and batch.seqs == [b, c]
    while sim.sched.has_unfinished():
        sim.step()
    for seq, prompt in ((a, [1, 2]), (b, [5, 6, 7, 8]), (c, [9, 10])):
        assert seq.completion_token_ids == alone(prompt, 8)


def test_a_sequence_alone_preempts_itself_never():
    sim = Sim(num_blocks=3, block_size=2, max_num_seqs=1, budget=8)
    a = sim.add("a", [1], 5)  # 6 tokens = 3 blocks: fits alone exactly
    while sim.sched.has_unfinished():
        assert not sim.step().preempted
    assert a.completion_token_ids == alone([1], 5)


def test_queue_limit_refuses_at_add():
    sim = Sim(num_blocks=8, block_size=4, max_num_seqs=1, budget=8, max_queued=2)
    sim.add("a", [1], 2)
    sim.add("b", [1], 2)
    with pytest.raises(QueueFullError, match="max_queued_requests=2"):
        sim.add("c", [1], 2)
    sim.step()  # a admitted: room again
    sim.add("c", [1], 2)


def test_budget_must_cover_a_decode_per_sequence():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=4, max_queued_requests=1)


request = st.tuples(
    st.integers(-1, 1),  # priority
    st.integers(0, 16),  # the prompt begins with this many tokens of the shared prefix
    st.lists(st.integers(0, 49), min_size=1, max_size=16),  # then its own tokens
    st.integers(1, 12),  # max_tokens
    st.integers(0, 10),  # arrival step
    st.one_of(st.none(), st.integers(0, 30)),  # abort at step
)


@settings(max_examples=200, deadline=None)
@given(
    shared=st.lists(st.integers(0, 49), min_size=16, max_size=16),
    drawn=st.lists(request, min_size=1, max_size=10),
    block_size=st.sampled_from([1, 2, 4, 8]),
    spare_blocks=st.integers(0, 20),
    max_num_seqs=st.integers(1, 6),
    extra_budget=st.integers(0, 24),
    hold_steps=st.sampled_from([0, 1, 4]),
    prefix_caching=st.booleans(),
)
def test_outputs_equal_serving_alone_whatever_the_schedule(shared, drawn, block_size, spare_blocks, max_num_seqs,
                                                           extra_budget, hold_steps, prefix_caching):
    requests = [(shared[:p] + own, m, arrival, abort_at) for _, p, own, m, arrival, abort_at in drawn]
    priorities = [d[0] for d in drawn]
    longest = max(len(p) + m for p, m, _, _ in requests)
    sim = Sim(blocks_for(longest, block_size) + spare_blocks, block_size, max_num_seqs, max_num_seqs + extra_budget,
              prefill_hold_s=hold_steps, prefix_caching=prefix_caching)  # the clock counts steps
    step = 0
    while step <= 10 or sim.sched.has_unfinished():
        sim.now = step
        for i, (prompt, max_tokens, arrival, abort_at) in enumerate(requests):
            rid = f"r{i}"
            if arrival == step:
                sim.add(rid, prompt, max_tokens, priorities[i])
            if abort_at == step and rid in sim.seqs and not sim.seqs[rid].is_finished:
                sim.abort(rid)
        sim.step()
        step += 1
        assert step < 2000, "no progress"
    assert sim.bm.num_used_blocks == 0
    for i, (prompt, max_tokens, _, _) in enumerate(requests):
        seq = sim.seqs[f"r{i}"]
        want = alone(prompt, max_tokens)
        if seq.finish_reason == "cancelled":
            assert seq.completion_token_ids == want[:seq.num_completion_tokens]
        else:
            assert seq.finish_reason == "length" and seq.completion_token_ids == want
