"""Speculative decoding by prompt lookup (router/speculative.py): drafts verified in one step give exactly the tokens
of one-at-a-time greedy decoding (the oracle: the same engine without drafts, itself checked against HF transformers
in test_exactness.py), for the three architectures, beside requests that do not draft, through stops, max_tokens,
preemption and prefix caching; and the drafts are accepted where the text repeats."""

from __future__ import annotations

import pytest
import torch

from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams
from moeserve.router.scheduler import ScheduledBatch
from moeserve.router.sequence import Sequence
from moeserve.router.speculative import NgramProposer, eligible


def _prompts(vocab: int) -> list[list[int]]:
    """Prompts whose text repeats (a phrase three times, a counted list) and random ones, of several lengths."""
    g = torch.Generator().manual_seed(3)
    phrase = torch.randint(3, vocab, (7,), generator=g).tolist()
    rand = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 19, 33)]
    counted = [3 + (i % 11) for i in range(30)]
    return [phrase * 3, rand[0], counted, rand[1] + phrase * 2, rand[2]]


def _engine(path: str, spec: int, **over) -> LLMEngine:
    cfg = dict(model=path, block_size=4, num_kv_blocks=200, max_num_seqs=8, max_num_batched_tokens=96,
               max_model_len=160, speculative_tokens=spec, ngram_min=1, ngram_max=3)
    return LLMEngine.from_config(EngineConfig(**{**cfg, **over}))


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], stagger: bool = True) -> list:
    """Each prompt's tokens, finish reason and text; with `stagger` one prompt arrives every other step."""
    got = {i: ([], None) for i in range(len(prompts))}
    step = 0
    while step < 2 * len(prompts) or engine.has_unfinished():
        if stagger and step % 2 == 0 and step // 2 < len(prompts):
            i = step // 2
            engine.add_request(str(i), prompts[i], params[i])
        elif not stagger and step == 0:
            for i, p in enumerate(prompts):
                engine.add_request(str(i), p, params[i])
        for out in engine.step():
            ids, _ = got[int(out.request_id)]
            got[int(out.request_id)] = (ids + out.new_token_ids, out.finish_reason)
        step += 1
        assert step < 3000
    return [got[i] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_drafts_give_greedy_decodings_tokens(arch, hf_checkpoint):
    path = str(hf_checkpoint(arch, seed=4))
    plain = _engine(path, 0)
    vocab = plain.model_config.vocab_size
    prompts = _prompts(vocab)
    greedy = [SamplingParams(max_tokens=24 + 3 * i) for i in range(len(prompts))]
    want = _run(plain, prompts, greedy)
    spec = _engine(path, 4)
    assert _run(spec, prompts, greedy) == want
    stats = spec.stats()
    assert stats["draft_tokens"] > 0 and stats["draft_tokens_accepted"] > 0, stats
    assert stats["steps"] < plain.stats()["steps"]  # more than one token a step where the drafts held
    assert stats["tokens_generated"] == plain.stats()["tokens_generated"]
    from moeserve.cluster.telemetry import engine_gauges  # what Prometheus exports of them

    gauges = engine_gauges(stats)
    assert (gauges["draft_tokens"], gauges["draft_tokens_accepted"]) == (stats["draft_tokens"],
                                                                          stats["draft_tokens_accepted"])

    # stop token ids, and requests that cannot draft (sampled with a seed, penalties) or draft with logprobs
    # beside them, all arriving at once: everything as without drafts (the same engines, their caches warm)
    stop_at = [ids[len(ids) // 2] for ids, _ in want]
    mixed = [SamplingParams(max_tokens=24, stop_token_ids=(stop_at[0],)),
             SamplingParams(max_tokens=16, temperature=0.8, seed=7),
             SamplingParams(max_tokens=20, stop_token_ids=(stop_at[2],)),
             SamplingParams(max_tokens=16, logprobs=2),
             SamplingParams(max_tokens=16, presence_penalty=0.5)]
    drafted = stats["draft_tokens"]
    want = _run(plain, prompts, mixed, stagger=False)
    assert _run(spec, prompts, mixed, stagger=False) == want
    assert [r for _, r in want][:3:2] == ["stop", "stop"]
    assert spec.stats()["draft_tokens"] > drafted  # drafts verified in this part too


def test_drafts_between_padded_graph_steps_and_look_ahead_keep_the_tokens(hf_checkpoint):
    """With decode steps on the fixed-shape padded path (the CUDA graphs' step, run eagerly on the CPU) and decode
    steps queued ahead of the previous step's tokens: a step that verifies drafts is never queued ahead (its
    tokens decide the next), and the tokens stay those without drafts."""
    path = str(hf_checkpoint("qwen3_moe", seed=4))
    prompts = _prompts(256)
    greedy = [SamplingParams(max_tokens=30 + 3 * i) for i in range(len(prompts))]
    plain = _engine(path, 0, decode_graphs="padded")
    want = _run(plain, prompts, greedy)
    spec = _engine(path, 4, decode_graphs="padded")
    assert spec.overlap_decode and _run(spec, prompts, greedy) == want
    stats = spec.stats()
    assert stats["draft_tokens_accepted"] > 0 and 0 < stats["steps_ahead"] < plain.stats()["steps_ahead"], stats


def test_drafts_under_preemption_and_prefix_caching_keep_the_tokens(hf_checkpoint):
    """A KV cache small enough that decodes preempt (drafts take only free blocks), and a prompt repeated so that
    the prefix cache serves it: blocks registered after a verified draft hold the right tokens' KV."""
    path = str(hf_checkpoint("qwen3_moe", seed=4))
    prompts = _prompts(256)
    prompts += [prompts[0], prompts[3]]  # from the prefix cache, with blocks a drafted decode filled
    greedy = [SamplingParams(max_tokens=48) for _ in prompts]
    want = _run(_engine(path, 0, num_kv_blocks=48), prompts, greedy)
    spec = _engine(path, 6, num_kv_blocks=48)
    assert _run(spec, prompts, greedy) == want
    stats = spec.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0 and stats["draft_tokens_accepted"] > 0


def test_prompt_lookup_drafts_what_followed_the_newest_ngram():
    proposer = NgramProposer(4, ngram_min=1, ngram_max=3)
    seq = Sequence("r", [1, 2, 3, 4, 5, 9, 2, 3], SamplingParams(max_tokens=8))
    assert proposer.propose(seq, 10) == [4, 5, 9, 2]  # "2 3" occurred before, followed by 4 5 9 2
    assert proposer.propose(seq, 2) == [4, 5]
    seq.token_ids += [7]  # "7" and "3 7" never occurred before
    assert proposer.propose(seq, 4) == []
    seq.token_ids += [1, 2]  # "7 1 2"? no; "1 2" yes: the last occurrence before the newest, at the start
    assert proposer.propose(seq, 4) == [3, 4, 5, 9]
    seq.token_ids += [3]  # now "1 2 3" occurred at the start: its continuation
    assert proposer.propose(seq, 4) == [4, 5, 9, 2]
    assert NgramProposer(4, 2, 3).propose(Sequence("s", [5, 5], SamplingParams(max_tokens=8)), 4) == []
    with pytest.raises(ValueError):
        NgramProposer(4, 3, 2)
    assert eligible(seq) and eligible(Sequence("t", [1], SamplingParams(max_tokens=8, temperature=0.5)))
    assert not eligible(Sequence("t", [1], SamplingParams(max_tokens=8, temperature=0.5, seed=1)))
    assert eligible(Sequence("t", [1], SamplingParams(max_tokens=8, logprobs=0)))
    assert not eligible(Sequence("t", [1], SamplingParams(max_tokens=8, repetition_penalty=1.2)))

    batch = ScheduledBatch()
    seq.num_computed_tokens = len(seq) - 1
    seq.block_table = [0, 1, 2]
    batch.add(seq, 1)
    batch.add_draft(0, [4, 5])
    assert batch.num_new_tokens == [3] and batch.chunks == [[3, 4, 5]] and batch.drafts == [[4, 5]]
    assert batch.subset([0]).drafts == [[4, 5]]


def _lookup(tokens: list[int], ngram_min: int, ngram_max: int, limit: int) -> list[int]:
    """Prompt lookup by brute force: the longest newest n-gram's last earlier occurrence, what followed it."""
    for n in range(min(ngram_max, len(tokens) - 1), ngram_min - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[-n:]:
                return tokens[start + n:start + n + limit]
    return []


@pytest.mark.parametrize("step", [4096, 3])
def test_the_incremental_index_drafts_what_brute_force_lookup_finds(step, monkeypatch):
    """Grown a few tokens at a time (and, with a small INDEX_STEP, a few positions a call), the index drafts what
    a search of the whole sequence finds, once it has caught up."""
    import random

    from moeserve.router import speculative

    monkeypatch.setattr(speculative, "INDEX_STEP", step)
    rng = random.Random(step)
    for _ in range(200):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(3, 50))]
        seq, proposer = Sequence("x", tokens[:3], SamplingParams(max_tokens=8)), NgramProposer(5, 1, 3)
        for at in range(3, len(tokens) + 1, rng.randrange(1, 6)):
            seq.token_ids[:] = tokens[:at]
            for _ in range(len(tokens)):  # the calls of the steps it takes to catch up
                got = proposer.propose(seq, 5)
                if seq.draft_index[0] >= len(seq) - 1:
                    break
            assert got == _lookup(seq.token_ids, 1, 3, 5), seq.token_ids


def test_sampled_drafts_keep_the_distribution_of_one_token_a_step():
    """Speculative sampling with a draft that is one token for sure: each position samples from its own
    distribution given the draft before it, and postprocess keeps drafted tokens while the samples equal them. On a
    Markov chain over 4 tokens, the first two tokens so emitted (a step short of two going on one token a step) are
    distributed as sampling one at a time gives them: within 0.01 of each exact probability over 40000 trials."""
    from moeserve.router.block_manager import BlockManager
    from moeserve.router.scheduler import Scheduler
    from moeserve.router.sequence import SequenceStatus

    g = torch.Generator().manual_seed(0)
    chain = torch.softmax(torch.randn(4, 4, generator=g) * 1.5, dim=-1)  # next-token distribution after each token
    last, draft, trials = 1, [2, 0], 40000
    # every position samples on its own: after the last token, then after each drafted one
    picks = torch.stack([torch.multinomial(chain[t], trials, replacement=True, generator=g)
                         for t in [last] + draft], dim=1).tolist()
    going_on = torch.multinomial(chain, trials, replacement=True, generator=g)  # [after token, trial]
    scheduler = Scheduler(BlockManager(8, 4, prefix_caching=False), 4, 64, 8)
    counts = torch.zeros(4, 4)
    for trial in range(trials):
        seq = Sequence("r", [last], SamplingParams(max_tokens=8, temperature=1.0))
        seq.status, seq.block_table = SequenceStatus.RUNNING, [0]
        batch = ScheduledBatch()
        batch.add(seq, 1)
        batch.add_draft(0, draft)
        scheduler.postprocess(batch, picks[trial])
        first = seq.token_ids[1]
        second = seq.token_ids[2] if len(seq) > 2 else int(going_on[first, trial])
        counts[first, second] += 1
    exact = chain[last][:, None] * chain
    assert (counts / trials - exact).abs().max() < 0.01
    kept = chain[last][draft[0]] * (1 + chain[draft[0]][draft[1]])  # tokens kept a trial, on average
    assert abs(scheduler.num_accepted_tokens / trials - kept) < 0.01


def test_unseeded_sampled_requests_draft_and_seeded_ones_do_not(hf_checkpoint):
    engine = _engine(str(hf_checkpoint("mixtral", seed=4)), 4)
    prompts = _prompts(256)
    outs = _run(engine, prompts[:2], [SamplingParams(max_tokens=40, temperature=0.3),
                                      SamplingParams(max_tokens=40, temperature=0.3, seed=5)])
    assert [len(ids) for ids, _ in outs] == [40, 40] and [r for _, r in outs] == ["length", "length"]
    assert engine.stats()["draft_tokens_accepted"] > 0
    again = _run(_engine(str(hf_checkpoint("mixtral", seed=4)), 0), prompts[1:2],
                 [SamplingParams(max_tokens=40, temperature=0.3, seed=5)])
    assert again[0] == outs[1]  # the seeded one decoded one token a step: its tokens are its seed's


@pytest.mark.parametrize("field, value", [("speculative_tokens", -1), ("speculative_tokens", 65), ("ngram_min", 0),
                                          ("ngram_max", 1)])
def test_config_refuses_bad_speculative_settings(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value, **({"ngram_min": 2} if field == "ngram_max" else {})})


async def test_a_server_with_drafts_streams_the_same_tokens_and_text():
    """Over gRPC, with the demo model and its tokenizer: streamed messages carry a step's several tokens, and text
    with a stop string (cut in the middle of a verified run) as without drafts."""
    from edge_harness import running_server
    from moeserve.router.client import AsyncClient

    prompt = "one two three, one two three, one two three, one two"
    replies = []
    for spec in (0, 4):
        async with running_server(engine={"speculative_tokens": spec, "ngram_min": 1}) as srv, \
                AsyncClient(srv.address) as client:
            whole = await client.generate(prompt=prompt, max_tokens=40, ignore_eos=True)
            stop = whole.text[len(whole.text) // 2:len(whole.text) // 2 + 3]
            streamed = [m async for m in client.generate_stream(prompt=prompt, max_tokens=40, ignore_eos=True)]
            stopped = [m async for m in client.generate_stream(prompt=prompt, max_tokens=40, stop=[stop])]
            stats = srv.engine.stats()
        replies.append((list(whole.token_ids), whole.text, [t for m in streamed for t in m.token_ids],
                        [t for m in stopped for t in m.token_ids], "".join(m.text for m in stopped),
                        stopped[-1].finish_reason))
        if spec:
            assert stats["draft_tokens_accepted"] > 0 and any(len(m.token_ids) > 1 for m in streamed)
    assert replies[0] == replies[1]
    assert replies[0][2] == replies[0][0] and replies[0][5] == 2  # stop


def test_a_stop_inside_a_verified_run_drops_the_tokens_after_it(hf_checkpoint):
    """LLMEngine._on_token over a step's several tokens: each checked in turn, the request ends at the stop, and the
    tokens after it are neither returned nor kept."""
    engine = _engine(str(hf_checkpoint("qwen3_moe", seed=4)), 4)
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=20, stop_token_ids=(42,)))
    (first,) = engine.step()
    seq = engine.requests["r"]
    seq.token_ids += [11, 42, 13]  # as postprocess appends a verified run
    out = engine._on_token(seq, 0.0, None, 3)
    assert out.new_token_ids == [11, 42] and out.finished and out.finish_reason == "stop"
    assert seq.token_ids[-2:] == [11, 42] and out.completion_tokens == 3 and "r" not in engine.requests
    engine.add_request("s", [5, 6, 7, 8], SamplingParams(max_tokens=4))
    engine.step()
    seq = engine.requests["s"]
    seq.token_ids += [11, 12, 13, 14]  # max_tokens reached at the third of them
    out = engine._on_token(seq, 0.0, None, 4)
    assert out.new_token_ids == [11, 12, 13] and out.finish_reason == "length" and out.completion_tokens == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_drafts_beside_cuda_graphs_and_look_ahead_give_greedy_decodings_tokens(arch, hf_checkpoint):
    """On a GPU: steps that verify drafts run eagerly between graphed decode steps queued ahead; the tokens are
    those of the engine without drafts."""
    path = str(hf_checkpoint(arch, seed=4))
    prompts = _prompts(256)
    greedy = [SamplingParams(max_tokens=40) for _ in prompts]
    want = _run(_engine(path, 0, device="cuda", dtype="float32"), prompts, greedy)
    spec = _engine(path, 4, device="cuda", dtype="float32")
    assert _run(spec, prompts, greedy) == want
    stats = spec.stats()
    assert stats["draft_tokens_accepted"] > 0 and stats["steps_ahead"] > 0, stats


def test_logprobs_of_verified_drafts_are_one_token_a_steps(hf_checkpoint):
    """A request asking for log-probabilities drafts too: each kept token comes with its row of the step (its
    log-probability and the top ones), as decoding one token a step gives them."""
    path = str(hf_checkpoint("mixtral", seed=4))
    prompts = _prompts(256)[:3]
    params = [SamplingParams(max_tokens=30, logprobs=3), SamplingParams(max_tokens=30, logprobs=0),
              SamplingParams(max_tokens=30)]
    want = _engine(path, 0).generate_batch(prompts, params)
    spec = _engine(path, 4)
    got = spec.generate_batch(prompts, params)
    assert spec.stats()["draft_tokens_accepted"] > 0
    for w, g in zip(want, got):
        assert g.new_token_ids == w.new_token_ids
        if w.logprobs is None:
            assert g.logprobs is None
            continue
        assert len(g.logprobs) == len(w.logprobs) == 30
        for a, b in zip(g.logprobs, w.logprobs):
            assert a[0] == pytest.approx(b[0], abs=1e-4) and list(a[1]) == list(b[1])
            assert list(a[2]) == pytest.approx(list(b[2]), abs=1e-4)
