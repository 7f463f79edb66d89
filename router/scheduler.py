"""Continuous batching over two deques (waiting, running) under a token budget and a sequence cap.

Each step: the running decodes first (one token each), then the prefill chunks of running sequences
still reading their prompt, then new sequences from the waiting queue while the budget, the cap and
the free KV blocks allow. When a decode needs a block and none is free, the newest running sequence
is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed (prompt and completion so far) when it is admitted again.

One exception to decodes first: when the decodes are all that keeps the prompts still to read
(running chunks and every waiting request) out of this step, the decodes sit this step out, each
decode at most once in DEFER_EVERY steps (so a steady stream of prompts cannot halve a request's
decode rate; counted per request, so a deferral of requests since finished does not hold back the
next burst's, as it did between a benchmark's warm-up wave and its measured one). A burst of
64 prompts of 256 tokens under a budget of 8192 then takes two prefill steps followed by pure decode
steps (CUDA graphs), instead of a third, mixed step of 63 decodes and the last 32 prompt tokens, run
eagerly (on an H200: 72-203 ms against ~19 ms for a graphed step; with the deferral Qwen3-30B-A3B
at batch 64 went from 2376-2467 to 2811 output tokens/s, docs/benchmarks.md).

Priorities (SamplingParams.priority, lower first): admission takes the waiting request of the lowest
priority, the first in queue order among equals, and a decode short of a block preempts the request of
the highest priority value among those not yet scheduled this step, the newest among equals. Until a
request with a priority other than 0 arrives, both are the plain queue ends.

Prompts arriving while decodes run may be held back for up to `prefill_hold_s` (EngineConfig's
prefill_hold_ms, 0 by default; only where decode-only steps replay CUDA graphs), so that under a
steady stream of arrivals fewer steps carry a prompt beside the decodes: every running request's
next token waits for such a step. Held prompts are admitted together once the oldest has waited
that long, or at once when they fill a step's sequence slots or token budget, when no decode is
running, or when the step reads a prompt anyway (a running prefill chunk). The hold was worth 15-53%
of TPOT when such steps ran eagerly; since they replay graphs it trades TTFT for TPOT more evenly
(docs/benchmarks.md), so it is off unless asked for.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager, blocks_for
from .errors import QueueFullError
from .sequence import Sequence, SequenceStatus
from .speculative import NgramProposer, eligible


@dataclass
class ScheduledBatch:
    """The sequences of one step, in batch order, with how many new tokens each runs.

    What the step reads of each sequence (where its chunk starts, the chunk's token ids, its block
    table) is copied here when it is scheduled, under the engine's lock: the step runs without the
    lock, and a cancel meanwhile frees the sequence's blocks and empties its table."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample_flags: list[bool] = field(default_factory=list)  # reaches its last token, so samples the next
    preempted: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # position of each chunk's first token
    chunks: list[list[int]] = field(default_factory=list)  # each chunk's token ids (empty: read ahead)
    tables: list[list[int]] = field(default_factory=list)  # each sequence's block table
    # each decode's drafted tokens, verified in this step after its last token (router/speculative.py); [] for none
    drafts: list[list[int]] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        self._add(seq, n, start + n == len(seq), start, seq.token_ids[start:start + n])

    def add_ahead(self, seq: Sequence) -> None:
        """A decode of the token a pending step samples for seq (at position len(seq); its id is not
        known on the host yet: Scheduler.next_decode)."""
        self._add(seq, 1, True, len(seq), [])

    def _add(self, seq: Sequence, n: int, samples: bool, start: int, chunk: list[int]) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.sample_flags.append(samples)
        self.starts.append(start)
        self.chunks.append(chunk)
        self.tables.append(list(seq.block_table))
        self.drafts.append([])

    def add_draft(self, i: int, draft: list[int]) -> None:
        """Row i (a decode) verifies `draft` after its token: its chunk grows by the draft, every position
        samples (Scheduler.postprocess keeps what the model agrees with), and its table covers them."""
        self.num_new_tokens[i] += len(draft)
        self.chunks[i] = self.chunks[i] + draft
        self.tables[i] = list(self.seqs[i].block_table)
        self.drafts[i] = list(draft)

    def subset(self, rows: list[int]) -> "ScheduledBatch":
        """These rows of the batch, in this order, as a batch of their own."""
        part = ScheduledBatch()
        for name in ("seqs", "num_new_tokens", "sample_flags", "starts", "chunks", "tables", "drafts"):
            values = getattr(self, name)
            setattr(part, name, [values[i] for i in rows])
        return part

    @property
    def decode_only(self) -> bool:
        """Every sequence runs its last token, one, after a cached prefix, and samples the next (a
        prompt's one-token middle chunk does not)."""
        return (bool(self.seqs) and all(n == 1 for n in self.num_new_tokens) and all(self.starts)
                and all(self.sample_flags))

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


DEFER_EVERY = 8  # steps from one deferral of a request's decode to the next at the earliest


class Scheduler:
    """Picks each step's work; owns the waiting and running queues and the block manager."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_queued_requests: int, prefill_hold_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, proposer: NgramProposer | None = None):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs so every decode fits a step")
        self.prefill_hold_s = prefill_hold_s  # see the module docstring; 0 admits at the first step
        self.clock = clock  # the clock of Sequence.arrival_time
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queued_requests = max_queued_requests
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._step = 0  # steps scheduled so far
        self._deferred_step = -1  # the last one that left the decodes out
        self._prioritised = False  # a request with a priority other than 0 has arrived
        self.proposer = proposer  # speculative decoding's drafts (router/speculative.py); None: off
        self.num_draft_tokens = 0  # drafted tokens verified so far, and those the model agreed with
        self.num_accepted_tokens = 0

    @property
    def decodes_deferred(self) -> bool:
        """Whether the last step scheduled left the decodes out."""
        return self._deferred_step == self._step

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queued_requests:
            raise QueueFullError(
                f"{len(self.waiting)} requests already waiting (max_queued_requests={self.max_queued_requests}); retry later"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._prioritised = self._prioritised or seq.params.priority != 0

    def admissible_arrivals(self) -> tuple[float, float] | None:
        """(oldest, newest) arrival time of the waiting requests when the next step could still take
        one more of them in full (a free sequence slot, its prompt within the step's token budget);
        None when nothing waits or no newcomer would join the next step anyway (it is full, or holds
        the prompts back)."""
        if not self.waiting or len(self.running) + len(self.waiting) >= self.max_num_seqs:
            return None
        if self._hold_prompts():
            return None
        tokens = len(self.running) + sum(s.num_uncomputed_tokens for s in self.waiting)
        if tokens >= self.max_num_batched_tokens:
            return None
        arrivals = [s.arrival_time for s in self.waiting]
        return min(arrivals), max(arrivals)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Decodes, oldest first; a decode short of a block preempts from the newest end. Deferred
        # decodes still get their block (the newest token's slot), only not a place in this step.
        self._step += 1
        hold = self._hold_prompts()
        defer = not hold and self._defer_decodes()
        if defer:
            self._deferred_step = self._step
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_uncomputed_tokens == 1:
                while not bm.can_append(seq):
                    victim = self._victim(i)
                    self.running.remove(victim)
                    self._preempt(victim)
                    batch.preempted.append(victim)
                    if victim is seq:
                        break
                else:
                    bm.append(seq)
                    if defer:
                        seq.deferred_at_step = self._step
                    else:
                        batch.add(seq, 1)
                        budget -= 1
                if seq.status is SequenceStatus.WAITING:  # preempted itself: running[i] is now the next one
                    continue
            i += 1

        # 1b. Drafts for the decodes that take them (speculative decoding), from what budget the decodes left
        # and from free blocks: a draft never preempts, and prompts still to read come first.
        if self.proposer is not None and batch and not batch.preempted:
            budget = self._draft(batch, budget)

        # 2. Prefill chunks of running sequences still reading their prompt (blocks held since admission).
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed_tokens > 1:
                n = min(seq.num_uncomputed_tokens, budget)
                batch.add(seq, n)
                budget -= n

        # 3. Admission, first come first served, by KV capacity; none while this step had to preempt
        # or holds the prompts back.
        if batch.preempted or hold:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if not bm.try_allocate(seq):
                break
            self.waiting.remove(seq)
            if seq.num_cached_prompt_tokens is None:
                seq.num_cached_prompt_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            batch.add(seq, n)
            budget -= n
        return batch

    def _draft(self, batch: ScheduledBatch, budget: int) -> int:
        """Give this step's decodes their drafts (the step has only decodes so far); the budget left."""
        reading = sum(s.num_uncomputed_tokens for s in self.running if s.num_uncomputed_tokens > 1)
        spare = budget - reading
        bm = self.block_manager
        for i, seq in enumerate(batch.seqs):
            if spare < 1:
                break
            if not eligible(seq):
                continue
            # the step's tokens (the draft's, and the one sampled after them) stay within max_tokens
            room = min(spare, seq.params.max_tokens - seq.num_completion_tokens - 1)
            draft = self.proposer.propose(seq, room)
            if draft and bm.can_append(seq, len(draft)):
                bm.append(seq, len(draft))
                batch.add_draft(i, draft)
                spare -= len(draft)
                budget -= len(draft)
        return budget

    def next_decode(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The decode step that follows `batch` (a decode-only step whose sampled tokens are not back
        yet), for its sequences that go on: what schedule() would give once they are, when nothing
        else would join or change it. LLMEngine launches it before `batch`'s tokens reach the host.

        None when the next step could differ: a sequence of `batch` ended or was preempted, prompts
        wait that would be admitted (not held back), or a sequence would need a block that is not free
        (no preemption here). A sequence whose token from `batch` reaches its max_tokens is left out;
        one that ends otherwise (EOS, a stop) is only known later, and its row is then dropped. Each
        sequence's block table grows to cover the token it will read (position len(seq))."""
        if not batch.decode_only or batch.preempted or (self.waiting and not self._hold_prompts()):
            return None
        if len(self.running) != len(batch.seqs) or any(s.status is not SequenceStatus.RUNNING for s in batch.seqs):
            return None
        going = [s for s in batch.seqs if s.num_completion_tokens + 1 < s.params.max_tokens]
        bm = self.block_manager
        if not going or sum(bm.blocks_missing(s, 1) for s in going) > bm.num_free_blocks:
            return None
        self._step += 1
        nxt = ScheduledBatch()
        for seq in going:
            bm.append(seq, 1)
            nxt.add_ahead(seq)
        return nxt

    def _next_waiting(self) -> Sequence:
        """The waiting request admission takes next: the lowest priority, the first in queue order among equals."""
        if not self._prioritised:
            return self.waiting[0]
        return min(self.waiting, key=lambda s: s.params.priority)  # min keeps the first of equals

    def _victim(self, first: int) -> Sequence:
        """The running request to preempt, among those from position `first` on (not yet scheduled this step):
        the highest priority value, the newest among equals."""
        if not self._prioritised:
            return self.running[-1]
        candidates = [self.running[j] for j in range(first, len(self.running))]
        return max(reversed(candidates), key=lambda s: s.params.priority)  # max keeps the first (newest) of equals

    def _hold_prompts(self) -> bool:
        """Whether this step leaves the waiting prompts out so that it stays decodes alone (see the
        module docstring)."""
        if self.prefill_hold_s <= 0 or not self.waiting:
            return False
        decodes = 0
        for s in self.running:
            if s.num_uncomputed_tokens > 1:
                return False  # a prompt chunk runs this step: it is eager anyway
            decodes += s.num_uncomputed_tokens == 1
        if not decodes or len(self.waiting) >= self.max_num_seqs - len(self.running):
            return False
        if sum(s.num_uncomputed_tokens for s in self.waiting) >= self.max_num_batched_tokens - decodes:
            return False
        return self.clock() - min(s.arrival_time for s in self.waiting) < self.prefill_hold_s

    def _defer_decodes(self) -> bool:
        """Whether leaving this step's decodes out lets it read every prompt token still to read (the
        running chunks and every waiting request, within the sequence cap), which the decodes would
        otherwise push into one more step: the next step is then decodes alone. What it checks (the
        sequence cap, the token budget, the free blocks) is what admission needs, so a deferring step
        takes every waiting request and is never empty. Not when any of the decodes sat out one of the
        last DEFER_EVERY steps."""
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        if any(s.deferred_at_step is not None and self._step - s.deferred_at_step <= DEFER_EVERY for s in decoding):
            return False
        decodes = len(decoding)
        slots = self.max_num_seqs - len(self.running)
        if not decodes or len(self.waiting) > slots:
            return False
        prompt = sum(s.num_uncomputed_tokens for s in self.running if s.num_uncomputed_tokens > 1)
        prompt += sum(s.num_uncomputed_tokens for s in self.waiting)
        if not prompt or prompt > self.max_num_batched_tokens or prompt + decodes <= self.max_num_batched_tokens:
            return False
        # every one of those waiting requests must fit the free KV blocks too, or the step would not take them all
        bm = self.block_manager
        need = sum(blocks_for(len(s), bm.block_size) for s in self.waiting)
        need += sum(bm.blocks_missing(s) for s in self.running)  # the deferred decodes' next slots
        return need <= bm.num_free_blocks

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch, sampled: list[int]) -> list[Sequence]:
        """Record the step: advance each sequence's computed tokens and append its sampled token.

        `sampled` holds one token per sequence with a sample flag, in batch order, and a drafted decode's one per
        position (its draft's, then one more). Sequences finished (aborted) while the step ran are skipped. Returns
        the sequences that got a token (a drafted one 1 to len(draft) + 1 of them)."""
        got = []
        j = 0
        for seq, n, samples, draft in zip(batch.seqs, batch.num_new_tokens, batch.sample_flags, batch.drafts):
            token = sampled[j] if samples else None
            picks = sampled[j:j + len(draft) + 1] if draft else ()
            j += samples + len(draft)
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if draft:  # the draft's tokens the model agrees with, and its own pick after them
                kept = 0
                while kept < len(draft) and draft[kept] == picks[kept]:
                    kept += 1
                self.num_draft_tokens += len(draft)
                self.num_accepted_tokens += kept
                seq.num_computed_tokens += 1 + kept  # the rejected positions' KV is overwritten later
                seq.token_ids.extend(picks[:kept + 1])
                self.block_manager.register(seq)
                got.append(seq)
                continue
            seq.num_computed_tokens += n
            self.block_manager.register(seq)
            if token is not None:
                seq.token_ids.append(token)
                got.append(seq)
        return got

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of its queue for good and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
