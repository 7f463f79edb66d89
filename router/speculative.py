"""Speculative decoding by prompt lookup (n-gram drafts).

Where a request's newest tokens occurred earlier in its prompt or output, what followed them then is a cheap
guess of what follows now: code edited in place, a document quoted or summarised, a list continued. Each step
the scheduler drafts such a continuation (`NgramProposer.propose`: the longest of the newest ngram_max down
to ngram_min tokens that occurred before, the last such occurrence, up to EngineConfig.speculative_tokens
tokens after it) for each decoding request it may draft for (`eligible`), and the step computes the request's
last token and the drafted ones as one chunk, sampling the next token at every position. The draft's tokens
are kept while they equal what the model picked there; the model's pick after the last kept one comes too
(Scheduler.postprocess): 1 to k + 1 tokens a step, for a forward over k + 1 positions (on an MoE model, more
experts' weights read than one token's).

Greedy, that is the tokens one-at-a-time decoding gives. Sampled, the same distribution: each position samples
from its own distribution (temperature, top-k, top-p, min-p), conditioned on the draft before it, and a drafted
token is kept when the sample there equals it, so with probability p(draft); the first sample that differs is
distributed as p restricted to the other tokens: speculative sampling's rule for a draft that is one token for
sure (Leviathan et al.'s min(1, p/q) acceptance and (p - q)+ resampling with q a point mass).

Eligible: requests whose sampling does not read the tokens so far (no penalties, min_tokens), without a
structured output, and greedy or without a seed of their own: a seeded request's generator
would be drawn from once per drafted position, and its tokens would then depend on how much room the step had
for its draft, that is on the other requests. Others decode a token a step beside them.
"""

from __future__ import annotations

from typing import Any

from .sequence import Sequence

INDEX_STEP = 4096  # n-gram positions indexed in one call at most (a long prompt's first steps)


def eligible(seq: Sequence) -> bool:
    """Whether a sequence's tokens may be drafted: greedy or unseeded, and nothing in its sampling per position that
    a drafted row would have to reproduce (the history its penalties read, a grammar's state)."""
    p = seq.params
    return (p.greedy or p.seed is None) and not p.reads_history and p.structured_output is None


class NgramProposer:
    """Drafts by prompt lookup. Each sequence keeps an index of its n-grams (n in ngram_min..ngram_max) to
    the position after their last occurrence, grown by the tokens added since the last call: a lookup costs the
    same however long the sequence, and the index some 150 bytes of host memory per n-gram length and token
    (about 15 MB for a 32k-token request at the default 2..4), freed with the request."""

    def __init__(self, max_tokens: int, ngram_min: int = 2, ngram_max: int = 4):
        if not 1 <= ngram_min <= ngram_max or max_tokens < 1:
            raise ValueError(f"drafts need 1 <= ngram_min <= ngram_max and max_tokens >= 1, got {ngram_min}, "
                             f"{ngram_max}, {max_tokens}")
        self.max_tokens, self.ngram_min, self.ngram_max = max_tokens, ngram_min, ngram_max

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to min(limit, max_tokens) tokens to follow the sequence's newest, or [] when its newest n-gram occurred
        nowhere before (for every n)."""
        limit = min(limit, self.max_tokens)
        tokens = seq.token_ids
        if limit < 1 or len(tokens) <= self.ngram_min:
            return []
        index = self._index(seq)
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            after = index.get(tuple(tokens[-n:]))
            if after is not None:
                return tokens[after:after + limit]
        return []

    def _index(self, seq: Sequence) -> dict[tuple, int]:
        """The sequence's n-gram index, brought up to its tokens: every n-gram that ends before its newest token
        (so that a continuation follows it), to the position after its last such occurrence. A long prompt is
        indexed INDEX_STEP positions a call, oldest first (until then its later part is not looked up)."""
        state: Any = seq.draft_index
        if state is None:
            state = seq.draft_index = [0, {}]
        tokens, (done, index) = seq.token_ids, state
        stop = min(len(tokens) - 1, done + INDEX_STEP)  # n-grams ending at positions done .. stop - 1
        for n in range(self.ngram_min, self.ngram_max + 1):
            first, last = max(0, done - n + 1), stop - n  # their starts
            if last >= first:  # later occurrences come later, so the last one stays
                grams = zip(*(tokens[first + i:last + 1 + i] for i in range(n)))
                index.update(zip(grams, range(first + n, last + n + 1)))
        state[0] = max(done, stop)
        return index
