"""Request validation: every bad field is refused with InvalidRequestError naming it; good ones pass through."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.router.client import build_request
from moeserve.router.errors import InvalidRequestError
from moeserve.router.validation import Limits, validate
from moeserve.v1 import inference_pb2 as pb

VOCAB = 300
LIMITS = Limits(vocab_size=VOCAB, context_length=64, max_prompt_tokens=48, max_tokens=40, default_max_tokens=20,
                max_stop_strings=4, max_stop_string_chars=8, max_stop_token_ids=3, max_request_id_chars=16)


def utf8_bytes(text: str) -> list[int]:
    """A byte-level tokenizer: one token per UTF-8 byte (ids < 256 < VOCAB)."""
    return list(text.encode())


def check(req: pb.GenerateRequest):
    return validate(req, LIMITS, utf8_bytes)


def refused(req: pb.GenerateRequest) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        check(req)
    return info.value


def test_valid_text_request_becomes_engine_input():
    v = check(build_request("héllo", max_tokens=5, temperature=0.7, top_p=0.9, top_k=5, min_p=0.25, seed=7,
                            stop=["\n"], stop_token_ids=[3], ignore_eos=True, request_id="abc-1"))
    assert v.request_id == "abc-1"
    assert v.prompt_token_ids == list("héllo".encode())
    p = v.params
    assert (p.max_tokens, p.top_k, p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (5, 5, 7, ("\n",), (3,), True)
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9) and p.min_p == 0.25


def test_defaults_fill_in():
    v = check(build_request(token_ids=[1, 2, 3]))
    assert len(v.request_id) == 32  # generated
    assert v.params.max_tokens == 20 and v.params.top_p == 1.0 and v.params.top_k == 0 and v.params.seed is None
    # the default shrinks to the room left in the context
    assert check(build_request(token_ids=[1] * 48)).params.max_tokens == 16
    # top_k at or above the vocabulary keeps every token: the same as off
    assert check(build_request(token_ids=[1], top_k=VOCAB + 5)).params.top_k == 0


@pytest.mark.parametrize("req, field, words", [
    (pb.GenerateRequest(max_tokens=4), "prompt", "missing"),
    (build_request(""), "prompt", "empty"),
    (build_request(token_ids=[]), "token_ids", "empty"),
    (build_request(token_ids=[1, VOCAB]), "token_ids[1]", "outside the vocabulary"),
    (build_request("x" * 49), "prompt", "over the limit of 48"),
    (build_request(token_ids=[1] * 49), "token_ids", "over the limit of 48"),
    (build_request(token_ids=[1] * 30, max_tokens=35), "max_tokens", "exceeds the context length"),
    (build_request(token_ids=[1], max_tokens=41), "max_tokens", "over the limit of 40"),
    (build_request("hi", temperature=-0.1), "temperature", ">= 0"),
    (build_request("hi", temperature=math.nan), "temperature", "finite"),
    (build_request("hi", temperature=math.inf), "temperature", "finite"),
    (build_request("hi", top_p=0.0), "top_p", "(0, 1]"),
    (build_request("hi", top_p=1.5), "top_p", "(0, 1]"),
    (build_request("hi", top_p=math.nan), "top_p", "(0, 1]"),
    (build_request("hi", min_p=-0.1), "min_p", "[0, 1]"),
    (build_request("hi", min_p=math.nan), "min_p", "[0, 1]"),
    (build_request("hi", top_k=-1), "top_k", ">= 0"),
    (build_request("hi", stop=["a", "b", "c", "d", "e"]), "stop", "over the limit of 4"),
    (build_request("hi", stop=["ok", "way too long"]), "stop[1]", "over the limit of 8"),
    (build_request("hi", stop=[""]), "stop[0]", "empty"),
    (build_request("hi", stop_token_ids=[1, 2, 3, 4]), "stop_token_ids", "over the limit of 3"),
    (build_request("hi", stop_token_ids=[VOCAB + 1]), "stop_token_ids[0]", "outside the vocabulary"),
    (build_request("hi", request_id="r" * 17), "request_id", "over the limit of 16"),
    (build_request("hi", request_id="has space"), "request_id", "printable"),
    (build_request("hi", logprobs=21), "logprobs", "[0, 20]"),
    (build_request("hi", repetition_penalty=0.0), "repetition_penalty", "> 0"),
    (build_request("hi", repetition_penalty=math.nan), "repetition_penalty", "> 0"),
    (build_request("hi", presence_penalty=2.5), "presence_penalty", "[-2, 2]"),
    (build_request("hi", frequency_penalty=math.nan), "frequency_penalty", "[-2, 2]"),
    (build_request("hi", max_tokens=4, min_tokens=5), "min_tokens", "max_tokens = 4"),
    (build_request("hi", logit_bias={VOCAB: 1.0}), f"logit_bias[{VOCAB}]", "outside the vocabulary"),
    (build_request("hi", logit_bias={3: 101.0}), "logit_bias[3]", "[-100, 100]"),
    (build_request("hi", logit_bias={3: math.inf}), "logit_bias[3]", "[-100, 100]"),
    (build_request("hi", logit_bias={i: 1.0 for i in range(301)}), "logit_bias",
     "over the limit of 300"),
])
def test_each_bad_field_is_named(req, field, words):
    err = refused(req)
    assert err.field == field
    assert str(err).startswith(f"{field}: ") and words in str(err)


def test_prompt_that_leaves_no_room_is_refused():
    limits = Limits(vocab_size=VOCAB, context_length=8)
    assert limits.max_prompt_tokens == 7 and limits.max_tokens == 7
    assert validate(build_request(token_ids=[1] * 7), limits, utf8_bytes).params.max_tokens == 1
    with pytest.raises(InvalidRequestError, match="token_ids: 8 tokens is over the limit of 7"):
        validate(build_request(token_ids=[1] * 8), limits, utf8_bytes)


@pytest.mark.parametrize("kwargs, words", [
    (dict(context_length=1), "context_length"),
    (dict(max_prompt_tokens=64), "max_prompt_tokens"),
    (dict(max_tokens=100), "max_tokens"),
    (dict(max_stop_strings=99), "stop string limits"),
    (dict(default_max_tokens=0), "default_max_tokens"),
])
def test_limits_refuse_impossible_settings(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Limits(**{"vocab_size": VOCAB, "context_length": 64, **kwargs})


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2**32 - 1), max_size=60),
    max_tokens=st.integers(0, 2**32 - 1),
    temperature=st.floats(width=32),
    top_p=st.one_of(st.none(), st.floats(width=32)),
    top_k=st.integers(-(2**31), 2**31 - 1),
    stop=st.lists(st.text(max_size=10), max_size=6),
    request_id=st.text(max_size=20),
)
def test_any_request_is_either_valid_within_limits_or_refused_by_name(ids, max_tokens, temperature, top_p, top_k,
                                                                     stop, request_id):
    req = build_request(token_ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        stop=stop, request_id=request_id)
    try:
        v = check(req)
    except InvalidRequestError as err:
        assert err.field.split("[")[0] in pb.GenerateRequest.DESCRIPTOR.fields_by_name
        return
    assert 1 <= len(v.prompt_token_ids) <= LIMITS.max_prompt_tokens
    assert all(0 <= t < VOCAB for t in v.prompt_token_ids)
    assert 1 <= v.params.max_tokens <= LIMITS.max_tokens
    assert len(v.prompt_token_ids) + v.params.max_tokens <= LIMITS.context_length
    assert math.isfinite(v.params.temperature) and v.params.temperature >= 0
    assert 0 < v.params.top_p <= 1 and v.params.top_k >= 0
