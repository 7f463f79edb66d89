"""Look-ahead decode (EngineConfig.overlap_decode): a decode step queued before the previous step's
tokens reach the host gives the same tokens as waiting for them, and leaves no KV block behind.

On the CPU the fixed-shape steps run uncaptured ("padded"), which is where the look-ahead runs
without a GPU: the same scheduling, block bookkeeping, device-side input ids and dropped rows.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams
from moeserve.router.scheduler import ScheduledBatch, Scheduler
from moeserve.router.block_manager import BlockManager
from moeserve.router.sequence import Sequence, SequenceStatus


def _engine(path: str, overlap: bool, mode: str = "padded", **kw) -> LLMEngine:
    config = dict(model=path, block_size=4, num_kv_blocks=40, max_num_seqs=6, max_num_batched_tokens=32,
                  max_model_len=96, decode_graphs=mode, prefill_hold_ms=0, batch_wait_ms=0, overlap_decode=overlap)
    config.update(kw)
    return LLMEngine.from_config(EngineConfig(**config))


def _prompts(engine: LLMEngine, lens: list[int], seed: int = 3) -> list[list[int]]:
    vocab = engine.model_config.vocab_size
    return [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed + i)).tolist()
            for i, n in enumerate(lens)]


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
         abort_at: dict[int, str] | None = None, arrive_every: int = 2) -> dict[str, tuple[list[int], str | None]]:
    """Requests arrive one every `arrive_every` steps; abort_at: step -> request id to cancel then.
    Every request's tokens and finish reason."""
    got = {f"r{i}": ([], None) for i in range(len(prompts))}
    step = 0
    while step < arrive_every * len(prompts) or engine.has_unfinished():
        if step % arrive_every == 0 and step // arrive_every < len(prompts):
            i = step // arrive_every
            engine.add_request(f"r{i}", prompts[i], params[i])
        if abort_at and step in abort_at:
            out = engine.abort(abort_at[step])
            if out is not None:
                got[out.request_id] = (got[out.request_id][0], out.finish_reason)
        for out in engine.step():
            tokens, _ = got[out.request_id]
            got[out.request_id] = (tokens + out.new_token_ids, out.finish_reason)
        step += 1
        assert step < 3000
    return got


def _check_blocks_back(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    assert sorted(bm.free_blocks()) == list(range(bm.num_blocks))  # each block once


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_look_ahead_equals_waiting(arch, hf_checkpoint):
    """Staggered arrivals, mixed max_tokens (some end at a step the look-ahead leaves them out of),
    a stop id met mid-stream (its look-ahead row is dropped), a seeded sampled request and a
    cancellation while a step is queued ahead: the same tokens and reasons with and without look-ahead,
    and as the eager engine gives."""
    path = str(hf_checkpoint(arch, seed=4))
    lens = [5, 12, 3, 20, 9, 7, 14]
    probe = _engine(path, overlap=False, mode="off")
    prompts = _prompts(probe, lens)
    # the greedy tokens of request 1 alone: stop on the first new one from its 3rd on, so it ends by
    # "stop" mid-stream
    alone = probe.generate_batch([prompts[1]], SamplingParams(max_tokens=10))[0].new_token_ids
    at = next(j for j in range(2, 10) if alone[j] not in alone[:j])
    stop_id = alone[at]
    params = [SamplingParams(max_tokens=m) for m in (8, 10, 3, 12, 1, 9, 6)]
    params[1] = SamplingParams(max_tokens=10, stop_token_ids=(stop_id,))
    params[5] = SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=11)
    abort = {9: "r3"}

    want = _run(_engine(path, overlap=False, mode="off"), prompts, params, abort)
    want_r3 = _engine(path, overlap=False, mode="off").generate_batch([prompts[3]], params[3])[0].new_token_ids
    waiting = _engine(path, overlap=False)
    got_waiting = _run(waiting, prompts, params, abort)
    ahead = _engine(path, overlap=True)
    got = _run(ahead, prompts, params, abort)

    assert waiting.counters["steps_ahead"] == 0
    assert ahead.counters["steps_ahead"] > 4, "decode steps were meant to be queued ahead"
    assert got["r1"][1] == "stop" and got["r1"][0] == alone[:at + 1]
    # a request arriving while a step is queued ahead joins one step later, so the cancelled one may
    # have fewer tokens by the time it is cancelled: a prefix of the others'
    for run in (got, got_waiting, want):
        tokens, reason = run.pop("r3")
        assert reason == "cancelled" and tokens == want_r3[:len(tokens)] and tokens
    assert got == got_waiting == want
    _check_blocks_back(ahead)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_look_ahead_on_gpu_equals_eager(arch, hf_checkpoint):
    """On a GPU (captured graphs, ids sampled and read on the device, tokens copied back behind an
    event): the same tokens as the eager engine, float32, with a seeded sampled request."""
    path = str(hf_checkpoint(arch, seed=4))
    gpu = dict(device="cuda", dtype="float32")
    probe = _engine(path, overlap=False, mode="off", **gpu)
    prompts = _prompts(probe, [5, 12, 3, 20, 9, 7, 14])
    params = [SamplingParams(max_tokens=m) for m in (8, 10, 3, 12, 1, 9, 6)]
    params[5] = SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=11)
    want = _run(probe, prompts, params)
    engine = _engine(path, overlap=True, mode="auto", **gpu)
    got = _run(engine, prompts, params)
    assert engine.runner.graphs.capture and engine.counters["steps_ahead"] > 4
    assert got == want
    _check_blocks_back(engine)


def test_look_ahead_with_preemption(hf_checkpoint):
    """A KV cache small enough that decodes preempt: the look-ahead never preempts (it is simply not
    taken when a block is missing), and tokens equal the engine without it."""
    path = str(hf_checkpoint("qwen3_moe", seed=5))
    probe = _engine(path, overlap=False, mode="off")
    prompts = _prompts(probe, [6, 11, 17, 4, 9, 13], seed=9)
    params = [SamplingParams(max_tokens=14)] * len(prompts)
    small = dict(num_kv_blocks=16, max_model_len=64)
    want = _run(_engine(path, overlap=False, **small), prompts, params, arrive_every=1)
    engine = _engine(path, overlap=True, **small)
    got = _run(engine, prompts, params, arrive_every=1)
    assert engine.stats()["preemptions"] > 0, "the KV budget was meant to force preemption"
    assert engine.counters["steps_ahead"] > 0
    assert got == want
    _check_blocks_back(engine)


def test_abort_of_everything_in_flight(hf_checkpoint):
    """Every request of a step queued ahead is cancelled before the next step: the engine drops that
    step's tokens, frees every block, and serves the next request normally."""
    path = str(hf_checkpoint("mixtral", seed=6))
    engine = _engine(path, overlap=True)
    prompts = _prompts(engine, [5, 8, 30])
    for i in range(2):
        engine.add_request(f"a{i}", prompts[i], SamplingParams(max_tokens=20))
    while engine.counters["steps_ahead"] == 0:
        engine.step()
    assert engine._inflight is not None
    for i in range(2):
        assert engine.abort(f"a{i}").finish_reason == "cancelled"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.add_request("b", prompts[2], SamplingParams(max_tokens=5))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert {o.request_id for o in outs} == {"b"}
    alone = _engine(path, overlap=False, mode="off").generate_batch([prompts[2]], SamplingParams(max_tokens=5))
    assert sum((o.new_token_ids for o in outs), []) == alone[0].new_token_ids
    _check_blocks_back(engine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_extras_on_gpu(hf_checkpoint):
    """On a GPU (graphs, look-ahead for the rows that allow it): logprobs, penalties and min_tokens give the tokens
    of the eager engine without look-ahead or prefix caching (float32), and a request resumed past its first
    tokens (a trunk worker's resubmission) goes on with the same CUDA generator state."""
    path = str(hf_checkpoint("qwen3_moe", seed=4))
    gpu = dict(device="cuda", dtype="float32")
    eager = _engine(path, overlap=False, mode="off", prefix_caching=False, **gpu)
    prompts = _prompts(eager, [5, 12, 3, 20])
    prompts.append(prompts[1] + [7, 8, 9])  # shares prompts[1]'s whole blocks (block size 4)
    params = [SamplingParams(max_tokens=10, logprobs=3), SamplingParams(max_tokens=10, presence_penalty=0.7,
                                                                          repetition_penalty=1.3),
              SamplingParams(max_tokens=10, frequency_penalty=0.5, min_tokens=6), SamplingParams(max_tokens=10),
              SamplingParams(max_tokens=10, logprobs=2)]
    want = [o.new_token_ids for o in eager.generate_batch(prompts, params)]
    engine = _engine(path, overlap=True, mode="auto", **gpu)
    outs = engine.generate_batch(prompts, params)
    assert [o.new_token_ids for o in outs] == want
    assert engine.stats()["prefix_cache_hit_tokens"] > 0
    for out in (outs[0], outs[4]):
        assert [lp[1][0] for lp in out.logprobs] == out.new_token_ids  # greedy: the most likely token
    # prompt logprobs: their prefill steps run eagerly beside graphed decodes; the eager engine's values
    scored = SamplingParams(max_tokens=6, prompt_logprobs=2)
    [want_scored] = eager.generate_batch([prompts[3]], scored)
    [got_scored] = engine.generate_batch([prompts[3]], scored)
    assert got_scored.new_token_ids == want_scored.new_token_ids and len(got_scored.prompt_logprobs) == 19
    assert [e[0] for e in got_scored.prompt_logprobs] == pytest.approx([e[0] for e in want_scored.prompt_logprobs],
                                                                       abs=1e-4)
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=21, presence_penalty=0.4)
    [whole] = engine.generate_batch([prompts[0]], seeded)
    engine.add_request("resumed", prompts[0], seeded, resume=whole.new_token_ids[:4])
    rest = []
    while engine.has_unfinished():
        for out in engine.step():
            rest += out.new_token_ids
    assert rest == whole.new_token_ids[4:]


def test_next_decode_rules():
    """Scheduler.next_decode: only for a decode-only step of every running sequence; not while prompts
    wait to be admitted; a sequence reaching max_tokens is left out; blocks for the token read ahead."""
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16, max_queued_requests=8)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=5))
    b = Sequence("b", [4, 5, 6, 7], SamplingParams(max_tokens=1))  # its first token ends it
    for s in (a, b):
        sched.add(s)
    prefill = sched.schedule()
    assert sched.next_decode(prefill) is None  # prompts, not decodes
    sched.postprocess(prefill, [9, 9])
    decode = sched.schedule()
    assert decode.num_new_tokens == [1, 1]
    # a holds 4 tokens (one block); reading ahead at position 4 needs a second block
    nxt = sched.next_decode(decode)
    assert nxt is not None and nxt.seqs == [a] and nxt.sample_flags == [True]
    assert len(a.block_table) == 2
    c = Sequence("c", [1], SamplingParams(max_tokens=2))
    sched.add(c)
    assert sched.next_decode(decode) is None  # c would be admitted
    sched.finish(c, "cancelled")
    a.status = SequenceStatus.FINISHED
    assert sched.next_decode(decode) is None  # a sequence of the step ended
    assert sched.next_decode(ScheduledBatch()) is None


def test_every_sampling_kind_is_decoded_ahead():
    """Penalties and min_tokens take the pending token from the device; a grammar's row is sampled late (once the
    token is fed to its matcher on the host): every decode step may be queued ahead."""
    from moeserve.router.structured import StructuredOutput

    for params in (SamplingParams(max_tokens=5), SamplingParams(max_tokens=5, presence_penalty=0.5),
                   SamplingParams(max_tokens=5, min_tokens=2), SamplingParams(max_tokens=5, repetition_penalty=1.1),
                   SamplingParams(max_tokens=5, structured_output=StructuredOutput("regex", "[a-z]+"))):
        sched = Scheduler(BlockManager(num_blocks=6, block_size=4), max_num_seqs=4, max_num_batched_tokens=16,
                          max_queued_requests=8)
        sched.add(Sequence("a", [1, 2, 3], params))
        sched.postprocess(sched.schedule(), [9])
        decode = sched.schedule()
        assert sched.next_decode(decode) is not None, params


def test_look_ahead_with_structured_outputs_equals_waiting(demo_model_dir):
    """Structured rows beside plain, penalised and seeded ones on steps queued ahead (their forward queued at once,
    their sampling once the last token is fed to the matcher): the tokens of the engine that waits for each step,
    and of the eager one; structured requests ending (EOS) while a step is queued ahead have their rows dropped."""
    from moeserve.router.structured import StructuredOutput

    schema = '{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, ' \
             '"required": ["n"], "additionalProperties": false}'
    params = [SamplingParams(max_tokens=30, structured_output=StructuredOutput("json_schema", schema)),
              SamplingParams(max_tokens=12),
              SamplingParams(max_tokens=20, structured_output=StructuredOutput("regex", "[a-z]{3,12}")),
              SamplingParams(max_tokens=14, presence_penalty=1.0, repetition_penalty=1.2),
              SamplingParams(max_tokens=20, temperature=0.9, top_k=30, seed=5,
                             structured_output=StructuredOutput("choice", choices=("alpha", "beta", "gamma delta"))),
              SamplingParams(max_tokens=16, temperature=0.8, seed=9)]
    probe = _engine(str(demo_model_dir), overlap=False, mode="off", max_model_len=128)
    prompts = _prompts(probe, [5, 12, 3, 9, 7, 4])
    want = _run(probe, prompts, params, arrive_every=1)
    waiting = _run(_engine(str(demo_model_dir), overlap=False, max_model_len=128), prompts, params, arrive_every=1)
    ahead_engine = _engine(str(demo_model_dir), overlap=True, max_model_len=128)
    got = _run(ahead_engine, prompts, params, arrive_every=1)
    assert ahead_engine.counters["steps_ahead"] > 4, "structured decode steps were meant to be queued ahead"
    assert got == waiting == want
    for i in (0, 2, 4):
        assert got[f"r{i}"][1] == "eos", got[f"r{i}"]
    _check_blocks_back(ahead_engine)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_look_ahead_with_penalties_equals_waiting(arch, hf_checkpoint):
    """Repetition, presence and frequency penalties and min_tokens on steps queued ahead (their last token read from
    the device): the tokens of the engine that waits for each step, and of the eager one."""
    path = str(hf_checkpoint(arch, seed=4))
    probe = _engine(path, overlap=False, mode="off")
    prompts = _prompts(probe, [5, 12, 3, 9, 7])
    stop_id = probe.generate_batch([prompts[4]], SamplingParams(max_tokens=4))[0].new_token_ids[1]
    params = [SamplingParams(max_tokens=12, repetition_penalty=1.4), SamplingParams(max_tokens=10, presence_penalty=1.5,
                                                                                    frequency_penalty=0.7),
              SamplingParams(max_tokens=9, repetition_penalty=0.8, frequency_penalty=-0.6),
              SamplingParams(max_tokens=11, temperature=0.9, top_k=30, seed=5, presence_penalty=1.0),
              SamplingParams(max_tokens=8, min_tokens=5, stop_token_ids=(stop_id,))]
    want = _run(probe, prompts, params, arrive_every=1)
    waiting = _run(_engine(path, overlap=False), prompts, params, arrive_every=1)
    ahead_engine = _engine(path, overlap=True)
    got = _run(ahead_engine, prompts, params, arrive_every=1)
    assert ahead_engine.counters["steps_ahead"] > 4, "penalised decode steps were meant to be queued ahead"
    assert got == waiting == want
    assert len(got["r4"][0]) >= 5  # min_tokens held the stop id back
    _check_blocks_back(ahead_engine)


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_cancel_while_the_step_lays_out_its_batch(mode, hf_checkpoint):
    """A cancel from the event loop's thread can land after the schedule and before the step has read
    its sequences (the step holds no lock while it runs; an abort frees the blocks and empties the
    block table). The cancelled request ends; the others in the same step keep their exact tokens."""
    path = str(hf_checkpoint("qwen3_moe", seed=7))
    engine = _engine(path, overlap=True, mode=mode)
    prompts = _prompts(engine, [6, 9, 4], seed=21)
    params = SamplingParams(max_tokens=8)
    alone = _engine(path, overlap=False, mode="off").generate_batch(prompts, params)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    launch = engine.runner.launch
    cancelled = []

    def cancel_then_launch(batch, ready=None):
        if len(cancelled) < 2:  # in a prefill step, then in a decode step
            rid = f"r{len(cancelled)}"
            cancelled.append(engine.abort(rid).finish_reason)
        return launch(batch, ready)

    engine.runner.launch = cancel_then_launch
    got = {f"r{i}": [] for i in range(3)}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert cancelled == ["cancelled", "cancelled"]
    assert got["r2"] == alone[2].new_token_ids
    assert got["r0"] == [] and got["r1"] == alone[1].new_token_ids[:len(got["r1"])]
    _check_blocks_back(engine)
