"""Checks a GenerateRequest against the model and the server's limits, before it reaches the engine.

Pure logic: no gRPC, no engine. Every refusal is an InvalidRequestError naming the field the client
must fix (the edge maps it to INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Callable

from moeserve.router.errors import InvalidRequestError
from moeserve.router.sequence import MAX_LOGIT_BIAS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams
from moeserve.router.structured import KINDS, StructuredOutput


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for; built once from the model config and the serve flags."""

    vocab_size: int
    context_length: int
    max_prompt_tokens: int = 0  # 0: context_length - 1
    max_tokens: int = 0  # largest max_tokens accepted; 0: context_length - 1
    default_max_tokens: int = 256  # what max_tokens = 0 means (cut to the room left in the context)
    max_prompt_chars: int = 0  # text prompts longer than this are refused before tokenizing; 0: 32 per token
    max_stop_strings: int = MAX_STOP_STRINGS  # at most what the engine takes
    max_stop_string_chars: int = MAX_STOP_STRING_CHARS
    max_stop_token_ids: int = 64
    max_request_id_chars: int = 128

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        room = self.context_length - 1
        # frozen dataclass: fill the defaults that depend on the model through object.__setattr__
        if self.max_prompt_tokens == 0:
            object.__setattr__(self, "max_prompt_tokens", room)
        if self.max_tokens == 0:
            object.__setattr__(self, "max_tokens", room)
        if self.max_prompt_chars == 0:
            object.__setattr__(self, "max_prompt_chars", 32 * self.max_prompt_tokens)
        for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_prompt_chars",
                     "max_stop_string_chars", "max_request_id_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_stop_strings", "max_stop_token_ids"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_stop_strings > MAX_STOP_STRINGS or self.max_stop_string_chars > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop string limits must be <= the engine's ({MAX_STOP_STRINGS} strings of "
                             f"{MAX_STOP_STRING_CHARS} characters)")
        if self.max_prompt_tokens > room:
            raise ValueError(f"max_prompt_tokens must be <= context_length - 1 = {room}, got {self.max_prompt_tokens}")
        if self.max_tokens > room:
            raise ValueError(f"max_tokens must be <= context_length - 1 = {room}, got {self.max_tokens}")


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request the engine can take as is."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


def _check_request_id(request_id: str, limits: Limits) -> str:
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidRequestError(
            "request_id", f"{len(request_id)} characters is over the limit of {limits.max_request_id_chars}"
        )
    # ids end up in logs and traces: printable ASCII without spaces keeps them safe to print
    if not all("!" <= c <= "~" for c in request_id):
        raise InvalidRequestError("request_id", "use printable ASCII characters without spaces")
    return request_id


def _check_ids(field: str, ids, vocab_size: int) -> list[int]:
    out = list(ids)
    for i, tok in enumerate(out):
        if tok >= vocab_size:
            raise InvalidRequestError(f"{field}[{i}]", f"token id {tok} is outside the vocabulary [0, {vocab_size})")
    return out


def _prompt_ids(request, limits: Limits, encode: Callable[[str], list[int]]) -> tuple[str, list[int]]:
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("prompt", "is missing: set prompt (text) or token_ids")
    if which == "prompt":
        text = request.prompt
        if not text:
            raise InvalidRequestError("prompt", "is empty")
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(
                "prompt", f"{len(text)} characters is over the limit of {limits.max_prompt_chars}"
            )
        ids = list(encode(text))
        if not ids:
            raise InvalidRequestError("prompt", "encodes to no tokens")
        return "prompt", _check_ids("prompt", ids, limits.vocab_size)
    ids = request.token_ids.ids
    if not ids:
        raise InvalidRequestError("token_ids", "is empty")
    if len(ids) > limits.max_prompt_tokens:  # before the per-id loop: a huge list is refused in O(1)
        raise InvalidRequestError(
            "token_ids", f"{len(ids)} tokens is over the limit of {limits.max_prompt_tokens}"
        )
    return "token_ids", _check_ids("token_ids", ids, limits.vocab_size)


def _max_tokens(request, field: str, prompt_len: int, limits: Limits) -> int:
    if prompt_len > limits.max_prompt_tokens:
        raise InvalidRequestError(field, f"{prompt_len} tokens is over the limit of {limits.max_prompt_tokens}")
    room = limits.context_length - prompt_len
    if request.max_tokens == 0:
        return min(limits.default_max_tokens, limits.max_tokens, room)
    if request.max_tokens > limits.max_tokens:
        raise InvalidRequestError("max_tokens", f"{request.max_tokens} is over the limit of {limits.max_tokens}")
    if request.max_tokens > room:
        raise InvalidRequestError(
            "max_tokens",
            f"the prompt ({prompt_len} tokens) plus max_tokens ({request.max_tokens}) exceeds the context "
            f"length of {limits.context_length}; ask for at most {room} new tokens",
        )
    return request.max_tokens


def _sampling(request) -> tuple[float, float, int]:
    temperature = request.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequestError("temperature", f"must be a finite number >= 0 (0 is greedy), got {temperature}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):  # also refuses NaN
        raise InvalidRequestError("top_p", f"must be in (0, 1], got {top_p}")
    if request.top_k < 0:
        raise InvalidRequestError("top_k", f"must be >= 0 (0 disables it), got {request.top_k}")
    return float(temperature), float(top_p), int(request.top_k)


def _stops(request, limits: Limits) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stop = request.stop
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequestError("stop", f"{len(stop)} stop strings is over the limit of {limits.max_stop_strings}")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequestError(f"stop[{i}]", "is empty")
        if len(s) > limits.max_stop_string_chars:
            raise InvalidRequestError(
                f"stop[{i}]", f"{len(s)} characters is over the limit of {limits.max_stop_string_chars}"
            )
    ids = request.stop_token_ids
    if len(ids) > limits.max_stop_token_ids:
        raise InvalidRequestError(
            "stop_token_ids", f"{len(ids)} ids is over the limit of {limits.max_stop_token_ids}"
        )
    return tuple(stop), tuple(_check_ids("stop_token_ids", ids, limits.vocab_size))


def _logit_bias(request, limits: Limits) -> dict[int, float]:
    bias = request.logit_bias
    if len(bias) > MAX_LOGIT_BIAS:  # before the per-id loop
        raise InvalidRequestError("logit_bias", f"{len(bias)} tokens is over the limit of {MAX_LOGIT_BIAS}")
    for token in bias:
        if token >= limits.vocab_size:
            raise InvalidRequestError(f"logit_bias[{token}]", f"token id {token} is outside the vocabulary "
                                                              f"[0, {limits.vocab_size})")
    return dict(bias)


def _structured_output(request) -> StructuredOutput | None:
    if not request.HasField("structured_output"):
        return None
    so = request.structured_output
    kind = so.WhichOneof("constraint")
    if kind is None:
        raise InvalidRequestError("structured_output", "is empty: set one of " + ", ".join(KINDS))
    if kind == "json_object":
        if not so.json_object:
            raise InvalidRequestError("structured_output.json_object", "must be true when set")
        return StructuredOutput("json_object")
    if kind == "choice":
        return StructuredOutput("choice", choices=tuple(so.choice.values))
    return StructuredOutput(kind, getattr(so, kind))


def validate(request, limits: Limits, encode: Callable[[str], list[int]]) -> ValidRequest:
    """Check a moeserve.v1.GenerateRequest; return what the engine needs or raise InvalidRequestError."""
    request_id = _check_request_id(request.request_id, limits)
    temperature, top_p, top_k = _sampling(request)
    stop, stop_token_ids = _stops(request, limits)
    field, prompt = _prompt_ids(request, limits, encode)
    max_tokens = _max_tokens(request, field, len(prompt), limits)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=0 if top_k >= limits.vocab_size else top_k,  # k >= vocabulary keeps every token
        min_p=request.min_p,
        seed=request.seed if request.HasField("seed") else None,
        stop=stop,
        include_stop_str_in_output=request.include_stop_str_in_output,
        stop_token_ids=stop_token_ids,
        ignore_eos=request.ignore_eos,
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
        repetition_penalty=request.repetition_penalty if request.HasField("repetition_penalty") else 1.0,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        min_tokens=request.min_tokens,
        priority=request.priority,
        logit_bias=_logit_bias(request, limits),
        structured_output=_structured_output(request),
    )
    return ValidRequest(request_id=request_id, prompt_token_ids=prompt, params=params)
