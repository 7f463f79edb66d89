"""Incremental detokenisation and stop strings.

Text is decoded a few tokens at a time with left context, so tokenizers that merge or mark spaces
decode as they would in one piece, and a token that ends inside a UTF-8 character waits for the next.
Stop strings are matched on the decoded text, across token boundaries; what follows the match is dropped,
and the match too unless asked to keep it (`include_stop`); any tail that could still grow into a stop
string is held back until it cannot.
"""

from __future__ import annotations

from typing import Protocol, Sequence

_CONTEXT_TOKENS = 6  # prompt tokens decoded as left context of the first completion token
_INCOMPLETE = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a sequence's completion tokens into text deltas, watching for stop strings."""

    __slots__ = ("tokenizer", "tokens", "prefix_offset", "read_offset", "text", "emitted", "stop", "max_stop", "stopped",
                 "include_stop")

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 include_stop: bool = False):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] is already-decoded context
        self.read_offset = len(self.tokens)
        self.text = ""  # completion text decoded so far (cut at a stop string once one matched)
        self.emitted = 0  # characters of `text` handed out as deltas
        self.stop = tuple(stop)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.stopped = False
        self.include_stop = include_stop  # the text ends with the stop string that matched, not before it

    def add_token(self, token_id: int) -> bool:
        """Decode one more completion token; True when a stop string has now matched."""
        if self.stopped:
            return True
        self.tokens.append(token_id)
        new_text = self._decode_pending()
        if new_text and not new_text.endswith(_INCOMPLETE):
            self._consume(new_text)
            return self._match_stop(len(new_text))
        return False

    def _decode_pending(self) -> str:
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def _consume(self, new_text: str) -> None:
        self.text += new_text
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)

    def _match_stop(self, delta_len: int) -> bool:
        if not self.stop:
            return False
        # Only matches that end inside the new text are new; they start at most max_stop - 1 before it.
        start = max(0, len(self.text) - delta_len - self.max_stop + 1)
        hits = [(i, -len(s)) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        at, minus_len = min(hits)  # the first match; of those starting there, the longest
        self.text = self.text[:at - minus_len if self.include_stop else at]
        self.stopped = True
        return True

    def _holdback(self) -> int:
        """Length of the longest unemitted tail of `text` that is a proper prefix of a stop string."""
        longest = min(self.max_stop - 1, len(self.text) - self.emitted)
        for k in range(longest, 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def take_delta(self, finished: bool) -> str:
        """The text safe to hand out now; on finish, everything left (an incomplete character included)."""
        if finished and not self.stopped and self.read_offset < len(self.tokens):
            rest = self._decode_pending()
            self._consume(rest)
            self._match_stop(len(rest))
        end = len(self.text) if finished else len(self.text) - self._holdback()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta
