"""A request as the engine tracks it: its tokens, KV blocks, sampling parameters and progress."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError
from .structured import StructuredOutput

if TYPE_CHECKING:
    from .detokenizer import IncrementalDetokenizer

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # most likely alternatives a request may ask for per token

# One generated token's log-probability under the model, and the most likely tokens' (ids, log-probabilities).
TokenLogprobs = tuple[float, tuple[int, ...], tuple[float, ...]]
MAX_STOP_STRING_CHARS = 256
MAX_LOGIT_BIAS = 300  # tokens a request may bias (OpenAI's limit)
LOGIT_BIAS_RANGE = 100.0  # a bias is in [-100, 100], as in OpenAI's API


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop; validated on construction."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # [0, 1], 0 = off: drop tokens less likely than min_p times the most likely (after top-k/p)
    seed: int | None = None  # per-request generator: same tokens whatever else is batched
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # the text ends with the stop string that matched (default: before it)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n most likely tokens'
    prompt_logprobs: int | None = None  # as logprobs, for the prompt's tokens from its second on (no prefix cache)
    repetition_penalty: float = 1.0  # > 0, 1 = off: a seen token's logit divided by it if positive, else multiplied
    presence_penalty: float = 0.0  # [-2, 2]: subtracted from the logit of each token generated so far
    frequency_penalty: float = 0.0  # [-2, 2]: times the number of times each token was generated so far
    min_tokens: int = 0  # no EOS nor stop id before this many new tokens
    priority: int = 0  # scheduling: lower is admitted first and preempted last; equal keeps arrival order
    # added to the logits of these token ids before penalties, temperature, top-k and top-p (greedy feels it too);
    # a dict or (id, bias) pairs, kept as pairs sorted by id
    logit_bias: tuple[tuple[int, float], ...] = ()
    # the output held to a JSON Schema, JSON object, regex, grammar or choice list (router/structured.py)
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:  # also refuses NaN
            raise InvalidRequestError("min_p", f"must be in [0, 1] (0 = off), got {self.min_p!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                raise InvalidRequestError(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        if not (0.0 < self.repetition_penalty < math.inf):
            raise InvalidRequestError("repetition_penalty", f"must be a finite number > 0 (1 = off), got "
                                                            f"{self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(name, f"must be in [-2, 2] (0 = off), got {getattr(self, name)!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be an integer in [0, max_tokens = {self.max_tokens}], got "
                                                    f"{self.min_tokens!r}")
        if not isinstance(self.priority, int) or not -2**31 <= self.priority < 2**31:
            raise InvalidRequestError("priority", f"must be a 32-bit integer, got {self.priority!r}")
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise InvalidRequestError("structured_output", f"must be a StructuredOutput, got "
                                                               f"{type(self.structured_output).__name__}")
            # The grammar ends the output with end-of-sequence: neither may hold it back.
            if self.ignore_eos:
                raise InvalidRequestError("ignore_eos", "cannot be combined with structured_output (a complete "
                                                        "output ends with end-of-sequence)")
            if self.min_tokens:
                raise InvalidRequestError("min_tokens", "cannot be combined with structured_output (a complete "
                                                        "output ends with end-of-sequence)")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS:
                raise InvalidRequestError("stop", f"each stop string must be 1..{MAX_STOP_STRING_CHARS} characters, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def reads_history(self) -> bool:
        """Whether sampling looks at the tokens so far (penalties, min_tokens). A step queued ahead takes the last
        one from the device (sampler.apply_history's `pending`)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0)

    @property
    def needs_last_token(self) -> bool:
        """Whether the next token's sampling needs this one on the host (a grammar's state is fed there): a decode
        step queued ahead of it queues its forward at once and its sampling once this token is back
        (ModelRunner.complete)."""
        return self.structured_output is not None


def _logit_bias(bias) -> tuple[tuple[int, float], ...]:
    pairs = list(bias.items() if isinstance(bias, dict) else bias)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidRequestError("logit_bias", f"{len(pairs)} tokens is over the limit of {MAX_LOGIT_BIAS}")
    out: dict[int, float] = {}
    for pair in pairs:
        token, value = pair
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidRequestError("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
                -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise InvalidRequestError(f"logit_bias[{token}]", f"must be a number in [-{LOGIT_BIAS_RANGE:g}, "
                                                              f"{LOGIT_BIAS_RANGE:g}], got {value!r}")
        if token in out:
            raise InvalidRequestError("logit_bias", f"token id {token} is given twice")
        out[token] = float(value)
    return tuple(sorted(out.items()))


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text since the previous output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # detokenised delta, stop strings removed
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "eos" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None  # seconds from arrival to first token, once known
    metrics: "RequestMetrics | None" = None  # on the last output only
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache when it was first admitted
    logprobs: list[TokenLogprobs] | None = None  # with SamplingParams.logprobs: one per new token
    # with SamplingParams.prompt_logprobs, on the first output with a token: one per prompt token from the second on
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """A finished request's timeline (time.monotonic() seconds) and sizes, for metrics and traces."""

    request_id: str
    arrival_time: float
    first_scheduled_time: float | None  # None: it never left the waiting queue
    first_token_time: float | None
    finished_time: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def check_admission(prompt: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                    has_tokenizer: bool) -> None:
    """What an engine checks before it queues a request (InvalidRequestError naming the field)."""
    if not prompt:
        raise InvalidRequestError("prompt_token_ids", "must not be empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise InvalidRequestError("prompt_token_ids", f"token ids must be in [0, {vocab_size})")
    if len(prompt) + params.max_tokens > max_model_len:
        raise InvalidRequestError("max_tokens", f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) "
                                  f"exceeds the context length {max_model_len}")
    for field, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
        if ids and max(ids) >= vocab_size:
            raise InvalidRequestError(field, f"token id {max(ids)} is outside the vocabulary [0, {vocab_size})")
    if params.stop and not has_tokenizer:
        raise InvalidRequestError("stop", "stop strings need a tokenizer; this engine has none")


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One request's tokens (prompt then completion) and how many of them have KV in the cache."""

    __slots__ = (
        "request_id", "params", "token_ids", "num_prompt_tokens", "num_computed_tokens", "block_table",
        "status", "finish_reason", "arrival_time", "first_token_time", "deadline", "generator",
        "detokenizer", "num_emitted_tokens", "first_scheduled_time", "deferred_at_step", "num_cached_blocks",
        "prefix_serial", "num_cached_prompt_tokens", "grammar", "prompt_logprobs", "draft_index",
    )

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float = 0.0, deadline: float | None = None):
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in this sequence's blocks
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.deadline = deadline
        self.generator: Any = None  # torch.Generator of a seeded request, set by the engine
        self.detokenizer: IncrementalDetokenizer | None = None
        self.num_emitted_tokens = 0  # completion tokens already handed to the caller
        self.first_scheduled_time: float | None = None  # when it first got a step (queue wait ends)
        self.deferred_at_step: int | None = None  # the scheduler step that last left its decode out
        self.num_cached_blocks = 0  # leading blocks of block_table whose tokens the prefix cache knows (registered
        # from this sequence or found there): where BlockManager.register goes on
        self.prefix_serial = 0  # the serial number of the last of those (0: none)
        self.num_cached_prompt_tokens: int | None = None  # prompt tokens read from the prefix cache at first admission
        self.grammar: Any = None  # structured output: the xgrammar matcher of the tokens generated so far
        # SamplingParams.prompt_logprobs: those of prompt positions 1.. computed so far (None: not asked, or sent)
        self.prompt_logprobs: list | None = [] if params.prompt_logprobs is not None else None
        self.draft_index: Any = None  # speculative decoding: its n-grams' index (router/speculative.py)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, len={len(self)}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.name})")

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


def token_stop_reason(seq: Sequence, token_id: int, eos_token_ids: frozenset[int]) -> str | None:
    """Finish reason decided by the token id just sampled (EOS unless ignored, a stop id), or None.

    max_tokens is checked after stop strings (`length_reached`), so a stop on the last token says "stop".
    """
    params = seq.params
    if not params.ignore_eos and token_id in eos_token_ids:
        return "eos"
    if token_id in params.stop_token_ids:
        return "stop"
    return None


def length_reached(seq: Sequence) -> bool:
    return seq.num_completion_tokens >= seq.params.max_tokens
