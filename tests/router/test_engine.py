"""LLMEngine (the synchronous core) on a tiny real checkpoint: config, sizing, validation, stops, seeds."""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import checkpoint_with_tokenizer, copy_with_eos
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams
from moeserve.router.errors import InvalidRequestError, QueueFullError

N = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("engine") / "tok-ckpt")


@pytest.fixture(scope="module", params=["off", "padded"])
def engine(ckpt, request):
    """The engine eager, and with fixed-shape steps and look-ahead decode ("padded": the stop checks
    then see a token while the next decode step is already queued)."""
    return LLMEngine.from_config(EngineConfig(model=str(ckpt), num_kv_blocks=128, block_size=8,
                                              decode_graphs=request.param))


@pytest.fixture(scope="module")
def greedy(engine):
    """(prompt, its greedy continuation of N tokens, the continuation's text)."""
    prompt = engine.tokenizer.encode("hello world, the quick")
    [out] = engine.generate_batch([prompt], SamplingParams(max_tokens=N))
    assert out.new_text == engine.tokenizer.decode(out.new_token_ids)
    return prompt, out.new_token_ids, out.new_text


def _first_new(tokens: list[int]) -> int:
    """Index of a token that does not occur before it (a clean stop point), past the first few."""
    return next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("field, value", [
    ("device", "tpu"), ("dtype", "int8"), ("block_size", 0), ("max_num_seqs", 0), ("max_num_batched_tokens", 8),
    ("max_model_len", 1), ("kv_cache_memory_bytes", 0), ("gpu_memory_fraction", 1.5), ("num_kv_blocks", 0),
    ("max_queued_requests", 0), ("expert_backend", 3), ("model", ""),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"EngineConfig\.{field} must be"):
        EngineConfig(**{"max_num_seqs": 16, field: value})


def test_kv_blocks_sized_from_the_byte_budget(ckpt):
    e = LLMEngine.from_config(EngineConfig(model=str(ckpt), kv_cache_memory_bytes=1 << 20, block_size=16))
    per_token = e.model.kv_cache_bytes_per_token()
    mla = e.model_config.mla
    assert per_token == e.model_config.num_hidden_layers * (mla.kv_lora_rank + mla.qk_rope_head_dim) * 4  # the latent
    assert e.stats()["kv_blocks_total"] == (1 << 20) // (per_token * 16)
    assert e.max_model_len == e.model_config.max_position_embeddings
    small = LLMEngine.from_config(EngineConfig(model=str(ckpt), num_kv_blocks=3, block_size=16))
    assert small.max_model_len == 48  # capped by what the cache can hold
    with pytest.raises(ValueError, match="max_model_len=64 does not fit the KV cache"):
        LLMEngine.from_config(EngineConfig(model=str(ckpt), num_kv_blocks=3, block_size=16, max_model_len=64))
    with pytest.raises(ValueError, match="budget holds no block"):
        LLMEngine.from_config(EngineConfig(model=str(ckpt), kv_cache_memory_bytes=100))


def test_invalid_requests_name_the_field(engine, hf_checkpoint):
    p = SamplingParams(max_tokens=4)
    cases = [([], p, "prompt_token_ids"), ([1, 400], p, "prompt_token_ids"), ([-1], p, "prompt_token_ids"),
             ([1] * 250, SamplingParams(max_tokens=7), "max_tokens")]
    for prompt, params, field in cases:
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("bad", prompt, params)
        assert err.value.field == field
    engine.add_request("dup", [1, 2], p)
    with pytest.raises(InvalidRequestError, match="already in flight"):
        engine.add_request("dup", [3], p)
    engine.abort("dup")
    bare = LLMEngine.from_config(EngineConfig(model=str(hf_checkpoint("mixtral", seed=3)), num_kv_blocks=16))
    assert bare.tokenizer is None
    with pytest.raises(InvalidRequestError) as err:
        bare.add_request("s", [1], SamplingParams(max_tokens=2, stop=("x",)))
    assert err.value.field == "stop"
    assert not engine.has_unfinished() and engine.stats()["kv_blocks_used"] == 0


def test_queue_limit(ckpt):
    e = LLMEngine.from_config(EngineConfig(model=str(ckpt), num_kv_blocks=16, max_num_seqs=1, max_queued_requests=2))
    p = SamplingParams(max_tokens=2)
    e.add_request("a", [1], p)
    e.add_request("b", [1], p)
    with pytest.raises(QueueFullError, match="max_queued_requests=2"):
        e.add_request("c", [1], p)
    assert set(e.requests) == {"a", "b"}


def test_length_and_usage(engine, greedy):
    prompt, tokens, _ = greedy
    [out] = engine.generate_batch([prompt], SamplingParams(max_tokens=7))
    assert out.new_token_ids == tokens[:7] and out.finish_reason == "length"
    assert out.prompt_tokens == len(prompt) and out.completion_tokens == 7
    assert out.time_to_first_token is not None and out.time_to_first_token >= 0


def test_stop_token_ids(engine, greedy):
    prompt, tokens, _ = greedy
    k = _first_new(tokens)
    [out] = engine.generate_batch([prompt], SamplingParams(max_tokens=N, stop_token_ids=(tokens[k],)))
    assert out.finish_reason == "stop" and out.new_token_ids == tokens[: k + 1]  # the stop id is returned, not its text
    assert out.new_text == engine.tokenizer.decode(tokens[:k])


def test_eos_and_ignore_eos(ckpt, greedy, tmp_path):
    prompt, tokens, _ = greedy
    k = _first_new(tokens)
    e = LLMEngine.from_config(EngineConfig(model=str(copy_with_eos(ckpt, tmp_path / "eos", tokens[k])), num_kv_blocks=64))
    assert e.eos_token_ids == {tokens[k]}
    [out] = e.generate_batch([prompt], SamplingParams(max_tokens=N))
    assert out.finish_reason == "eos" and out.new_token_ids == tokens[: k + 1]
    assert out.new_text == e.tokenizer.decode(tokens[:k])
    [out] = e.generate_batch([prompt], SamplingParams(max_tokens=N, ignore_eos=True))
    assert out.finish_reason == "length" and out.new_token_ids == tokens


def test_min_tokens_holds_back_eos_and_stop_ids(ckpt, greedy, tmp_path):
    prompt, tokens, _ = greedy
    k = _first_new(tokens)
    e = LLMEngine.from_config(EngineConfig(model=str(copy_with_eos(ckpt, tmp_path / "eos", tokens[k])), num_kv_blocks=64))
    for held in (dict(), dict(stop_token_ids=(tokens[k],))):  # the token as EOS, then as a stop id (EOS ignored)
        params = dict(max_tokens=N, ignore_eos=bool(held), **held)
        [out] = e.generate_batch([prompt], SamplingParams(min_tokens=k + 2, **params))
        assert tokens[k] not in out.new_token_ids[:k + 2] and out.new_token_ids[:k] == tokens[:k]
        assert len(out.new_token_ids) >= k + 2
        [out] = e.generate_batch([prompt], SamplingParams(min_tokens=k, **params))  # reached before it: no effect
        assert out.new_token_ids == tokens[:k + 1] and out.finish_reason in ("eos", "stop")


def test_stop_string_across_tokens(engine, greedy):
    prompt, tokens, text = greedy
    tok = engine.tokenizer
    pieces = [tok.decode(tokens[: i + 1])[len(tok.decode(tokens[:i])):] for i in range(len(tokens))]
    # the last character of one token's text and the first of the next one's
    i = next(i for i in range(3, len(tokens) - 1)
             if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[i][-1] + pieces[i + 1][0]
    [out] = engine.generate_batch([prompt], SamplingParams(max_tokens=N, stop=(stop,)))
    assert out.finish_reason == "stop" and out.new_text == text[: text.find(stop)]
    assert out.new_token_ids == tokens[: len(out.new_token_ids)]
    assert stop in tok.decode(out.new_token_ids) and stop not in tok.decode(out.new_token_ids[:-1])
    assert (engine.counters["steps_ahead"] > 0) == (engine.config.decode_graphs == "padded")


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, ckpt):
    prompt = engine.tokenizer.encode("the lazy dog")
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    [alone] = engine.generate_batch([prompt], seeded)
    companions = [[5, 6, 7], list(range(40, 90)), [9]]
    plist = [SamplingParams(max_tokens=20), SamplingParams(max_tokens=9, temperature=1.3),
             SamplingParams(max_tokens=16, temperature=0.8, seed=7)]
    outs = engine.generate_batch(companions + [prompt], plist + [seeded])
    assert outs[-1].new_token_ids == alone.new_token_ids
    fresh = LLMEngine.from_config(EngineConfig(model=str(ckpt), num_kv_blocks=32, seed=99))
    assert fresh.generate_batch([prompt], seeded)[0].new_token_ids == alone.new_token_ids
    [other] = engine.generate_batch([prompt], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1235))
    assert other.new_token_ids != alone.new_token_ids


def test_a_resumed_request_goes_on_as_it_would_have(engine):
    """add_request(resume=): the tokens already generated count as output (max_tokens, min_tokens, penalties) and
    the seeded generator is advanced past them, so only the rest comes out, the same as uninterrupted."""
    prompt = engine.tokenizer.encode("the lazy dog")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=77, presence_penalty=0.5,
                            frequency_penalty=0.4, min_tokens=8)
    [whole] = engine.generate_batch([prompt], params)
    engine.add_request("resumed", prompt, params, resume=whole.new_token_ids[:5])
    rest = []
    while engine.has_unfinished():
        for out in engine.step():
            rest += out.new_token_ids
    assert rest == whole.new_token_ids[5:]
    for bad in (whole.new_token_ids, [engine.model_config.vocab_size]):
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("bad", prompt, params, resume=bad)
        assert err.value.field == "resume"


def test_warm_up_step_changes_no_output(ckpt, greedy):
    """The start-up warm-up step (run by ModelRunner on a GPU; called here on the CPU) writes garbage
    KV into blocks no request holds yet: every request that follows writes its slots before reading
    them, so greedy output is the same token for token."""
    engine = LLMEngine.from_config(EngineConfig(model=str(ckpt), num_kv_blocks=16, block_size=8,
                                                max_num_batched_tokens=96, max_model_len=80))
    engine.runner.warm_up_step(96, 40, 4)  # 2 sequences of 40 over 10 blocks: some used twice
    engine.runner.warm_up_step(200, 200, 1)  # one sequence longer than the cache: its block ids wrap
    prompt, tokens, _ = greedy
    [out] = engine.generate_batch([prompt], SamplingParams(max_tokens=N))
    assert out.new_token_ids == tokens


def test_warm_up_step_names_the_budget_that_does_not_fit(ckpt, monkeypatch):
    """A token budget whose activations do not fit beside the KV cache fails at start-up with a message
    that names the settings to lower, not with a bare out-of-memory error in the middle of serving."""
    engine = LLMEngine.from_config(EngineConfig(model=str(ckpt), num_kv_blocks=16, block_size=8))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.model, "forward", out_of_memory)
    with pytest.raises(RuntimeError, match="max_num_batched_tokens.*gpu_memory_fraction"):
        engine.runner.warm_up_step(64, 32, 2)
