"""Structured output: a request's tokens held to a JSON Schema, any JSON object, a regular expression, an EBNF
grammar, a list of choices, or a structural tag (free text with parts in formats of their own: tool calls).

The grammar engine is xgrammar (the one vLLM and SGLang use): a spec compiles, once per engine and cached, against
the tokenizer's vocabulary; each request gets a matcher that knows which tokens may come next. Before sampling, the
sampler masks every other token to -inf in the rows of such requests (`apply_grammar`), then the engine feeds the
sampled token to the matcher (`LLMEngine._on_token`). Once the output is complete only end-of-sequence is allowed,
so a structured request ends with finish reason "eos" (or "length" if max_tokens cut it short, as in OpenAI's API).

Such a row needs its previous token on the host before its next mask (SamplingParams.needs_last_token): a decode
step queued ahead of it (look-ahead decode) queues its forward and logits at once and its sampling once that token
has been fed to the matcher (ModelRunner.complete), so the mask is filled while the GPU runs the forward. JSON is
generated without free whitespace (xgrammar's any_whitespace off): a model cannot spend its tokens on blank space
between fields.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice", "structural_tag")
MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar's text at most
MAX_TAG_CHARS = 256 * 1024  # a structural tag's (every tool's schema of a chat)
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must be: `kind` one of KINDS; `spec` the JSON Schema's JSON text, the regex, the EBNF
    grammar (start rule `root`) or the JSON of an xgrammar structural tag (free text with tagged parts, as tool
    calls are held to: router/tool_calls.py); `choices` for kind "choice". Checked on construction except the
    spec's syntax, which the engine's compiler checks (InvalidRequestError naming structured_output.<kind>)."""

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        field = f"structured_output.{self.kind}"
        if self.kind not in KINDS:
            raise InvalidRequestError("structured_output", f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "choice":
            if not 0 < len(self.choices) <= MAX_CHOICES:
                raise InvalidRequestError(field, f"must hold 1..{MAX_CHOICES} strings, got {len(self.choices)}")
            for i, c in enumerate(self.choices):
                if not isinstance(c, str) or not 0 < len(c) <= MAX_CHOICE_CHARS:
                    raise InvalidRequestError(f"{field}[{i}]", f"must be a string of 1..{MAX_CHOICE_CHARS} characters")
        elif self.kind != "json_object":
            if not isinstance(self.spec, str) or not self.spec.strip():
                raise InvalidRequestError(field, "is empty")
            limit = MAX_TAG_CHARS if self.kind == "structural_tag" else MAX_SPEC_CHARS
            if len(self.spec) > limit:
                raise InvalidRequestError(field, f"{len(self.spec)} characters is over the limit of {limit}")
        if self.kind in ("json_schema", "structural_tag"):
            try:
                schema = json.loads(self.spec)
            except ValueError as exc:
                raise InvalidRequestError(field, f"is not JSON: {exc}") from None
            if self.kind == "structural_tag" and not isinstance(schema, dict):
                raise InvalidRequestError(field, 'must be a structural tag (an object {"type": "structural_tag", '
                                                 '"format": ...})')
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(field, "must be a JSON Schema (an object)")


class Grammars:
    """Compiles StructuredOutput specs for one tokenizer and vocabulary, caching them, and makes each request's
    matcher. Built on the first structured request (importing xgrammar then)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]):
        try:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise InvalidRequestError("structured_output", f"needs the xgrammar package ({exc})") from None
        self._xgr = xgr
        stop = sorted(set(eos_token_ids) | set(tokenizer.eos_token_ids))
        if not stop:
            raise InvalidRequestError("structured_output", "needs an end-of-sequence token to end the output; this "
                                                           "model and its tokenizer name none")
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=stop)
        # Compiled from several threads at once (LLMEngine.prepare's, the engine's): xgrammar's compiler and its cache
        # take that (vLLM compiles on a thread pool with one compiler), so no lock here holds one compile up behind
        # another, the event loop's cache hits included.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)

    def compiled(self, so: StructuredOutput) -> Any:
        """`so` compiled (from the compiler's cache after the first time); InvalidRequestError when it does not."""
        try:
            return self._compile(so)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequestError(f"structured_output.{so.kind}", f"does not compile: {_first_line(exc)}") from None

    def matcher(self, so: StructuredOutput) -> Any:
        """A fresh xgrammar GrammarMatcher for `so`; InvalidRequestError when the spec does not compile."""
        return self._xgr.GrammarMatcher(self.compiled(so))

    def _compile(self, so: StructuredOutput) -> Any:
        c = self._compiler
        if so.kind == "json_schema":
            return c.compile_json_schema(so.spec, any_whitespace=False)
        if so.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if so.kind == "regex":
            return c.compile_regex(so.spec)
        if so.kind == "grammar":
            return c.compile_grammar(so.spec)
        if so.kind == "structural_tag":
            return c.compile_structural_tag(so.spec)
        # choice: one EBNF alternative per string, each a JSON-escaped literal
        return c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in so.choices))


def accept(matcher: Any, token: int) -> bool:
    """Feed a generated token to a request's matcher; False when the grammar does not allow it."""
    return bool(matcher.accept_token(token))


def apply_grammar(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """The logits with every token a row's matcher does not allow next set to -inf (a new tensor; the same one when
    no row has a matcher). One bitmask for the step, filled on the host and uploaded once."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    n, vocab = logits.shape
    bitmask = xgr.allocate_token_bitmask(n, vocab)  # every token allowed until filled
    if len(rows) == 1:
        matchers[rows[0]].fill_next_token_bitmask(bitmask, rows[0])
    else:  # the rows in parallel, on xgrammar's threads (outside the GIL)
        _batch_matcher().batch_fill_next_token_bitmask([matchers[i] for i in rows], bitmask, indices=rows)
    out = logits.clone()
    indices: list[int] | torch.Tensor = rows
    if out.device.type == "cuda":
        # Both uploads from pinned memory: xgrammar would copy a list of rows from pageable memory, a copy
        # CUDA may make wait for the stream (then a step queued ahead would wait for the forward before it).
        bitmask = bitmask.pin_memory().to(out.device, non_blocking=True)
        indices = torch.tensor(rows, dtype=torch.int32, pin_memory=True).to(out.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(out, bitmask, indices=indices)
    return out


@functools.lru_cache(maxsize=1)
def _batch_matcher() -> Any:
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
