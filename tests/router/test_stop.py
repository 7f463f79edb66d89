"""Incremental detokenisation and stop conditions, against a real byte-level BPE tokenizer.

The tokenizer is trained in-process (tokenizers library) on text with multi-byte characters, so
single tokens end inside UTF-8 characters and stop strings straddle token boundaries.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.router.detokenizer import IncrementalDetokenizer
from moeserve.router.sequence import SamplingParams, Sequence, length_reached, token_stop_reason

CORPUS = "hello world, the quick brown fox jumps over the lazy dog. STOP here! naïve café 日本語 🙂 <|end|> ### ok"
ALPHABET = "helo wrd,.!STOP#|<>naïvcafé日本語🙂\n"


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    t.train_from_iterator([CORPUS] * 20, trainer)
    return t


def _run(tok, prompt: str, completion_ids: list[int], stop=()):
    """Feed completion ids one at a time; the deltas handed out and whether a stop string matched."""
    d = IncrementalDetokenizer(tok, tok.encode(prompt).ids, stop)
    deltas = []
    for i, t in enumerate(completion_ids):
        stopped = d.add_token(t)
        last = stopped or i == len(completion_ids) - 1
        deltas.append(d.take_delta(finished=last))
        if stopped:
            return deltas, True
    return deltas, False


def test_multibyte_characters_wait_for_their_last_byte(tok):
    ids = tok.encode("日本語 🙂 café").ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the tokenizer really splits characters
    deltas, _ = _run(tok, "hello", ids)
    assert "".join(deltas) == "日本語 🙂 café"
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=300, deadline=None)
@given(prompt=st.text(ALPHABET, min_size=1, max_size=12), text=st.text(ALPHABET, max_size=40))
def test_deltas_join_to_the_full_decode(tok, prompt, text):
    ids = tok.encode(text).ids
    deltas, stopped = _run(tok, prompt, ids)
    assert not stopped
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def _expected_stop(tok, ids: list[int], stop: list[str], include: bool = False) -> tuple[str, bool]:
    """Reference: the text at the first token after which a stop string occurs, cut at the first match (after it,
    the longest starting there, with `include`)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        if text.endswith("\ufffd"):
            continue
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            at = min(hits)
            return text[: at + (max(len(s) for s in stop if text.find(s) == at) if include else 0)], True
    return tok.decode(ids), False


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(ALPHABET, max_size=40),
    stop=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=3),
    data=st.data(),
    include=st.booleans(),
)
def test_stop_strings_across_token_boundaries(tok, text, stop, data, include):
    if text and data.draw(st.booleans()):  # often make a stop string that really occurs
        i = data.draw(st.integers(0, len(text) - 1))
        stop = stop + [text[i : i + data.draw(st.integers(1, 4))]]
    ids = tok.encode(text).ids
    want, want_stopped = _expected_stop(tok, ids, stop, include)
    d = IncrementalDetokenizer(tok, tok.encode("ok ").ids, stop, include_stop=include)
    emitted = ""
    stopped = False
    for i, t in enumerate(ids):
        stopped = d.add_token(t)
        emitted += d.take_delta(finished=stopped or i == len(ids) - 1)
        # never hand out text that a stop string could still claim
        assert want.startswith(emitted), (emitted, want)
        if stopped:
            break
        # and hold back no more than a possible stop-string prefix (or an unfinished character)
        held = d.text[len(emitted):]
        assert len(held) < max(len(s) for s in stop)
        assert held == "" or any(s.startswith(held) for s in stop)
    assert stopped == want_stopped
    assert emitted == want


def test_stop_string_split_over_tokens_is_removed(tok):
    ids = tok.encode("the fox. STOP here").ids
    deltas, stopped = _run(tok, "hi", ids, stop=("STOP",))
    assert stopped and "".join(deltas) == "the fox. "
    deltas, stopped = _run(tok, "hi", ids, stop=("STOPPED", "fox"))
    assert stopped and "".join(deltas) == "the "


def test_held_back_prefix_is_released_when_it_cannot_stop(tok):
    d = IncrementalDetokenizer(tok, tok.encode("x").ids, ("##!",))
    out = []
    for t in tok.encode("ok ### ok").ids:
        assert not d.add_token(t)
        out.append(d.take_delta(finished=False))
    assert "".join(out) == "ok ### ok"[: len("".join(out))]
    assert "".join(out) + d.take_delta(finished=True) == "ok ### ok"


def _seq(**kw):
    seq = Sequence("r", [1, 2, 3], SamplingParams(**{"max_tokens": 3, **kw}))
    return seq


def test_token_stop_reasons():
    eos = frozenset({7})
    seq = _seq(stop_token_ids=(9,))
    assert token_stop_reason(seq, 7, eos) == "eos"
    assert token_stop_reason(seq, 9, eos) == "stop"
    assert token_stop_reason(seq, 8, eos) is None
    assert token_stop_reason(_seq(ignore_eos=True), 7, eos) is None
    assert token_stop_reason(_seq(ignore_eos=True, stop_token_ids=(7,)), 7, eos) == "stop"
    seq.token_ids += [4, 5]
    assert not length_reached(seq)
    seq.token_ids.append(6)
    assert length_reached(seq)
