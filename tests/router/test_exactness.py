"""Exactness under batching: greedy output served among 16 others equals served alone equals HF generate.

For each architecture, 17 requests of different prompt lengths arrive at different steps into an
engine with a small token budget (prefills are chunked and mixed with decodes) and a KV cache far
too small for all of them (sequences are preempted and recomputed); three are cancelled midway.
HF's own top-1/top-2 margins are checked first, so a near-tie shows up as a bad fixture, not noise.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

NEW_TOKENS = 16
PROMPT_LENS = [1, 2, 3, 5, 8, 13, 17, 24, 31, 40, 47, 55, 60, 9, 4, 33, 70]
CANCELLED = {3: 4, 8: 2, 12: 7}  # request index -> completion tokens after which it is aborted
MIN_MARGIN = 1e-4
# architecture -> (checkpoint seed, prompt seed); chosen for clear greedy margins
ARCHS = {"deepseek_v3": (0, 100), "qwen3_moe": (0, 100), "mixtral": (3, 200)}


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed + i)).tolist()
            for i, n in enumerate(PROMPT_LENS)]


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_greedy(hf, prompts: list[list[int]], options=lambda i: {}) -> list[list[int]]:
    """HF generate's greedy continuations of `prompts` (NEW_TOKENS each; `options(i)`: more generate keyword
    arguments). Its own top-1/top-2 margins are checked, so that a near-tie shows up as a bad fixture."""
    want = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, **options(i))
            top2 = torch.stack(out.scores).float().squeeze(1).topk(2, dim=-1).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
            assert margin > MIN_MARGIN, f"prompt {i} ({len(p)} tokens): HF near-tie (margin {margin:.1e}); pick others"
            want.append(out.sequences[0, len(p):].tolist())
    return want


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request, hf_checkpoint):
    """(checkpoint path, prompts, HF greedy continuations)."""
    ckpt_seed, prompt_seed = ARCHS[request.param]
    path = hf_checkpoint(request.param, seed=ckpt_seed)
    hf = _hf_model(path)
    prompts = _prompts(hf.config.vocab_size, prompt_seed)
    return str(path), prompts, _hf_greedy(hf, prompts)


def test_served_alone_equals_hf(case):
    path, prompts, want = case
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=64, block_size=8))
    for p, w in zip(prompts, want):
        [out] = engine.generate_batch([p], SamplingParams(max_tokens=NEW_TOKENS))
        assert out.new_token_ids == w and out.finish_reason == "length"
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_served_concurrently_equals_served_alone(case, mode):
    """mode "padded": decode and prompt steps take the fixed shapes of CUDA graphs (uncaptured on the
    CPU), and decode steps are queued one ahead of their tokens (look-ahead decode)."""
    path, prompts, want = case
    # 40 blocks of 4 = 160 token slots for 17 sequences of up to 86 tokens: preemption is certain.
    config = EngineConfig(model=path, block_size=4, num_kv_blocks=40, max_num_seqs=8, max_num_batched_tokens=24,
                          max_model_len=160, decode_graphs=mode)
    engine = LLMEngine.from_config(config)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    reasons: dict[str, str] = {}
    step = 0
    while step < 2 * len(prompts) or engine.has_unfinished():
        if step % 2 == 0 and step // 2 < len(prompts):  # one arrival every other step
            i = step // 2
            engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=NEW_TOKENS))
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        for i, after in CANCELLED.items():
            rid = f"r{i}"
            if rid not in reasons and len(got[rid]) >= after:
                used = engine.stats()["kv_blocks_used"]
                held = len(engine.requests[rid].block_table)
                out = engine.abort(rid)
                assert out.finished and out.finish_reason == "cancelled" and out.completion_tokens == len(got[rid])
                assert engine.stats()["kv_blocks_used"] == used - held  # freed at once
                reasons[rid] = "cancelled"
        step += 1
        assert step < 2000
    stats = engine.stats()
    assert stats["preemptions"] > 0, "the KV budget was meant to force preemption"
    assert (stats["steps_ahead"] > 0) == (mode == "padded")
    assert stats["kv_blocks_used"] == 0 and stats["waiting"] == stats["running"] == 0
    for i, w in enumerate(want):
        rid = f"r{i}"
        if i in CANCELLED:
            assert reasons[rid] == "cancelled" and len(got[rid]) < NEW_TOKENS
            assert got[rid] == w[: len(got[rid])]
        else:
            assert reasons[rid] == "length"
            assert got[rid] == w, f"request {i} (prompt of {len(prompts[i])}) differs when batched"


SHARED = 37  # tokens of a common prefix: four whole blocks of 8 and part of a fifth


@pytest.fixture(scope="module")
def shared_case(case):
    """Prompts that begin with one long prompt's first SHARED tokens (that prefix alone, its first 20 and its first
    33 among them), and HF's greedy continuations of each."""
    path, prompts, _ = case
    prefix = prompts[-1][:SHARED]
    shared = [prefix, prefix[:20], prefix[:33]] + [prefix + p for p in prompts[:8]] + [prefix[:16] + p for p in prompts[8:11]]
    return path, shared, _hf_greedy(_hf_model(path), shared)


@pytest.mark.parametrize("mode", ["off", "padded"])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefixes_equal_hf(shared_case, prefix_caching, mode):
    """Requests sharing a prefix, arriving one a step after the first has read it: with prefix caching the later
    ones read the cached blocks instead of computing them, and every output is still HF's (mode as above: a
    request whose prompt is cached but for its last token runs it as a decode)."""
    path, prompts, want = shared_case
    engine = LLMEngine.from_config(EngineConfig(model=path, block_size=8, num_kv_blocks=96, max_num_seqs=8,
                                                max_num_batched_tokens=64, prefix_caching=prefix_caching,
                                                decode_graphs=mode))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step = 0
    while step < len(prompts) or engine.has_unfinished():
        if step < len(prompts):
            engine.add_request(f"r{step}", prompts[step], SamplingParams(max_tokens=NEW_TOKENS))
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        step += 1
        assert step < 1000
    stats = engine.stats()
    # r0 reads the prefix; r1 (20 tokens) finds two of its blocks, r2 (33) four: only its last token is left to
    # compute, a decode; r3..r10 four, r11..r13 two
    hits = 8 * (2 + 4 + 8 * 4 + 3 * 2)
    assert stats["prefix_cache_hit_tokens"] == (hits if prefix_caching else 0)
    assert stats["kv_blocks_used"] == 0
    for i, w in enumerate(want):
        assert got[f"r{i}"] == w, f"request {i} (prompt of {len(prompts[i])}) differs from HF"


LOGPROB_PROMPTS = 5  # of the case's prompts
TOP = 5


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_logprobs_equal_hf(case, mode):
    """Each greedy token's log-probability and the 5 most likely tokens' equal HF generate's scores, log-softmaxed,
    for requests served together (padded: decode steps queued one ahead of their tokens, as on a GPU)."""
    path, prompts, want = case
    prompts, want = prompts[:LOGPROB_PROMPTS], want[:LOGPROB_PROMPTS]
    hf = _hf_model(path)
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=64, block_size=8, decode_graphs=mode))
    outs = engine.generate_batch(prompts, SamplingParams(max_tokens=NEW_TOKENS, logprobs=TOP))
    assert (engine.stats()["steps_ahead"] > 0) == (mode == "padded")
    for p, w, out in zip(prompts, want, outs):
        assert out.new_token_ids == w and len(out.logprobs) == NEW_TOKENS
        with torch.no_grad():
            scores = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True).scores
        ref = torch.log_softmax(torch.stack(scores).float().squeeze(1), dim=-1)
        for step, (token, (logprob, top_ids, top_logprobs)) in enumerate(zip(w, out.logprobs)):
            assert logprob == pytest.approx(float(ref[step, token]), abs=1e-4)
            values, ids = ref[step].topk(TOP)
            assert list(top_logprobs) == pytest.approx(values.tolist(), abs=1e-4)
            gaps = (values[:-1] - values[1:]).tolist()
            for rank, (ours, theirs) in enumerate(zip(top_ids, ids.tolist())):
                if (rank == 0 or gaps[rank - 1] > 1e-4) and (rank == TOP - 1 or gaps[rank] > 1e-4):  # no near-tie
                    assert ours == theirs, f"step {step}: rank {rank} is token {ours}, HF's {theirs}"


PENALISED = 6  # of the case's prompts
PENALTIES = [dict(repetition_penalty=1.3), dict(presence_penalty=0.8, frequency_penalty=0.4), dict(),
             dict(repetition_penalty=0.85, frequency_penalty=-0.5)]


def _openai_penalties(prompt_len: int, presence: float, frequency: float):
    """OpenAI's presence and frequency penalties as an HF logits processor: the reference the engine is held to."""
    from transformers import LogitsProcessor

    class Penalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = scores.clone()
            for row, ids in enumerate(input_ids[:, prompt_len:]):
                if len(ids):
                    counts = torch.bincount(ids, minlength=scores.shape[1]).to(scores.dtype)
                    out[row] -= presence * (counts > 0).to(scores.dtype) + frequency * counts
            return out

    return Penalties()


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_penalties_equal_hf(case, mode):
    """Greedy requests with repetition, presence and frequency penalties (and one without), served together: each
    output is HF generate's with its RepetitionPenaltyLogitsProcessor and an OpenAI-penalties processor."""
    from transformers import LogitsProcessorList

    path, prompts, plain = case
    prompts = prompts[:PENALISED]
    kinds = [PENALTIES[i % len(PENALTIES)] for i in range(len(prompts))]

    def penalties(i: int) -> dict:
        kind = kinds[i]
        return dict(repetition_penalty=kind.get("repetition_penalty", 1.0), logits_processor=LogitsProcessorList([
            _openai_penalties(len(prompts[i]), kind.get("presence_penalty", 0.0), kind.get("frequency_penalty", 0.0))]))

    want = _hf_greedy(_hf_model(path), prompts, penalties)
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=64, block_size=8, decode_graphs=mode))
    outs = engine.generate_batch(prompts, [SamplingParams(max_tokens=NEW_TOKENS, **kind) for kind in kinds])
    for p, kind, w, out in zip(prompts, kinds, want, outs):
        assert out.new_token_ids == w, f"prompt of {len(p)} with {kind} differs from HF"
    changed = {i % len(PENALTIES) for i, (w, base) in enumerate(zip(want, plain)) if w != base}
    assert changed >= {0, 1, 3}, "each kind of penalty should change some output, or the test shows nothing"


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_logit_bias_equals_hf_sequence_bias(case, mode):
    """Greedy requests with logit biases (one banning the token HF would pick first, one raising a token, one with a
    repetition penalty on top, one without), served together: each output is HF generate's with sequence_bias on
    single tokens (and its repetition penalty after the bias)."""
    path, prompts, plain = case
    prompts, plain = prompts[:4], plain[:4]
    biases = [{plain[0][0]: -100.0}, {plain[1][3]: 6.0, 17: -3.0}, {plain[2][1]: 4.0}, {}]
    penalties = [1.0, 1.0, 1.4, 1.0]
    want = _hf_greedy(_hf_model(path), prompts, lambda i: dict(
        sequence_bias={(t,): b for t, b in biases[i].items()} or None, repetition_penalty=penalties[i]))
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=64, block_size=8, decode_graphs=mode))
    outs = engine.generate_batch(prompts, [SamplingParams(max_tokens=NEW_TOKENS, logit_bias=b, repetition_penalty=r)
                                           for b, r in zip(biases, penalties)])
    for p, b, w, out in zip(prompts, biases, want, outs):
        assert out.new_token_ids == w, f"prompt of {len(p)} with logit_bias {b} differs from HF"
    assert want[0][0] != plain[0][0] and want[1] != plain[1] and want[2] != plain[2], \
        "each bias should change its output, or the test shows nothing"


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_prompt_logprobs_equal_hf(case, mode):
    """Each prompt token's log-probability (from the second on) and the 3 most likely tokens' at its position equal
    HF's forward over the prompt, log-softmaxed, for requests served together with prefill chunked by a small token
    budget (and the prefix cache, which such requests do not read); the generated tokens are unchanged."""
    path, prompts, want = case
    prompts = [prompts[i] for i in (16, 11, 3, 0)]  # 70, 55, 5 and 1 tokens
    want = [want[i] for i in (16, 11, 3, 0)]
    hf = _hf_model(path)
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=96, block_size=8, decode_graphs=mode,
                                                max_num_batched_tokens=64))
    engine.generate_batch([prompts[0][:40]], SamplingParams(max_tokens=1))  # a cached prefix of the first
    params = SamplingParams(max_tokens=NEW_TOKENS, prompt_logprobs=3)
    outs = engine.generate_batch(prompts, params)
    for p, w, out in zip(prompts, want, outs):
        assert out.new_token_ids == w and out.cached_prompt_tokens == 0
        assert len(out.prompt_logprobs) == len(p) - 1
        if len(p) < 2:
            continue
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), dim=-1)
        for pos, (logprob, top_ids, top_logprobs) in enumerate(out.prompt_logprobs):
            assert logprob == pytest.approx(float(ref[pos, p[pos + 1]]), abs=1e-4), f"position {pos}"
            assert list(top_logprobs) == pytest.approx(ref[pos].topk(3).values.tolist(), abs=1e-4)
            assert len(top_ids) == 3
    # KV for fewer tokens than the requests hold: some are preempted and recomputed; each prompt position's
    # log-probability is still reported once, with the same value
    small = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=20, block_size=8, decode_graphs=mode,
                                               max_num_batched_tokens=64))
    again = small.generate_batch(prompts, params)
    assert small.stats()["preemptions"] > 0, "nothing was preempted: the test shows nothing"
    for out, other in zip(outs, again):
        assert other.new_token_ids == out.new_token_ids and len(other.prompt_logprobs) == len(out.prompt_logprobs)
        assert [lp for lp, _, _ in other.prompt_logprobs] == pytest.approx([lp for lp, _, _ in out.prompt_logprobs],
                                                                            abs=1e-4)
