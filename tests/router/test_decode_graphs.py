"""Fixed-shape decode steps (router/cuda_graphs.py) give the tokens of the eager engine.

On the CPU the padded step runs without capture ("padded"): batch and context padding, the scratch
KV block, the device-side lengths and the bucket changes are all exercised. On a GPU ("auto") the
same workload replays captured CUDA graphs and must give the same tokens as the eager engine.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.models.layers import padded_attention
from moeserve.router.cuda_graphs import batch_buckets, context_bucket
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

PROMPT_LENS = [1, 3, 7, 12, 20, 31, 5, 44, 2, 60, 9]
NEW_TOKENS = 12


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert [context_bucket(n, 100) for n in (1, 8, 9, 16, 17, 70)] == [8, 8, 16, 16, 32, 100]
    assert context_bucket(5, 6) == 6


def _serve(path: str, mode: str, device: str = "cpu", dtype: str = "auto",
           capture_tokens: int = 2048) -> tuple[dict[str, list[int]], LLMEngine]:
    """Staggered arrivals, a KV cache small enough to preempt, greedy: every request's tokens. No prefill
    hold: it goes by the clock, and the schedule (preemptions, fixed-shape steps) must not."""
    config = EngineConfig(model=path, device=device, dtype=dtype, block_size=4, num_kv_blocks=24, max_num_seqs=6,
                          max_num_batched_tokens=24, max_model_len=96, decode_graphs=mode,
                          graph_capture_tokens=capture_tokens, prefill_hold_ms=0)
    engine = LLMEngine.from_config(config)
    vocab = engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(7 + i)).tolist()
               for i, n in enumerate(PROMPT_LENS)]
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step = 0
    while step < 3 * len(prompts) or engine.has_unfinished():
        if step % 3 == 0 and step // 3 < len(prompts):
            i = step // 3
            engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=NEW_TOKENS))
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        step += 1
        assert step < 2000
    assert all(len(v) == NEW_TOKENS for v in got.values())
    return got, engine


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_padded_decode_equals_eager(arch, hf_checkpoint):
    path = str(hf_checkpoint(arch, seed=1))
    want, eager = _serve(path, "off")
    assert eager.runner.graphs is None
    got, padded = _serve(path, "padded")
    graphs = padded.runner.graphs
    assert graphs is not None and graphs.steps > 20, "decode steps were meant to take the fixed-shape path"
    assert padded.stats()["preemptions"] > 0, "the KV budget was meant to force preemption"
    # arrivals while others decode: decodes beside a first chunk (or, with GQA, a chunk after a cached
    # prefix: preempted sequences find their blocks cached) ran as a prompt or chunk replay and a decode replay
    runner = padded.runner
    chunk_steps = runner.chunks.steps if runner.chunks is not None else 0
    assert runner.split_steps > 0 and runner.prompts.steps + chunk_steps > runner.split_steps
    assert got == want


def _prompts_in_turn(path: str, mode: str, groups: list[list[int]], device: str = "cpu",
                     dtype: str = "auto") -> tuple[list[list[int]], LLMEngine]:
    """Each group of prompts (their lengths) arrives at once and is served to the end before the next
    arrives, so its prompt step has the engine to itself; greedy: the tokens of each prompt."""
    config = EngineConfig(model=path, device=device, dtype=dtype, block_size=4, num_kv_blocks=40, max_num_seqs=4,
                          max_num_batched_tokens=40, max_model_len=64, decode_graphs=mode, prefill_hold_ms=0,
                          batch_wait_ms=0)
    engine = LLMEngine.from_config(config)
    vocab = engine.model_config.vocab_size
    got: dict[str, list[int]] = {}
    for g, lens in enumerate(groups):
        for i, n in enumerate(lens):
            rid = f"r{g}-{i}"
            got[rid] = []
            prompt = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(100 * g + i)).tolist()
            engine.add_request(rid, prompt, SamplingParams(max_tokens=6))
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
    return list(got.values()), engine


# one prompt at a time (16 and 32 tokens: the lengths captured within the 40-token budget), two at
# once (2 x 16 fits the budget, 2 x 32 does not), and prompts past the longest length
PROMPT_GROUPS = [[1], [5], [16], [9], [17], [32], [38], [5, 12], [16, 3], [20, 9]]


PROMPT_ARCHS = {"deepseek_v3": {}, "deepseek_v2": {}, "qwen3_moe": {}, "mixtral": {},
                "mixtral-window": {"sliding_window": 6}}  # a window shorter than most prompts


@pytest.mark.parametrize("arch", list(PROMPT_ARCHS))
def test_padded_prompt_equals_eager(arch, hf_checkpoint):
    """Prompt steps padded to (sequences, length) shapes (attention causal over each sequence's own
    keys, padding rows after the real ones); other prompt steps stay eager. Same tokens."""
    path = str(hf_checkpoint(arch.split("-")[0], seed=2, **PROMPT_ARCHS[arch]))
    want, _ = _prompts_in_turn(path, "off", PROMPT_GROUPS)
    got, padded = _prompts_in_turn(path, "padded", PROMPT_GROUPS)
    prompts = padded.runner.prompts
    assert prompts.lengths == [16, 32] and prompts.plan_ahead() == [(1, 32), (2, 16), (1, 16)]
    assert prompts.steps == 8  # all but the 38-token prompt and the 20 + 9 pair
    assert got == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", list(PROMPT_ARCHS))
def test_cuda_graph_prompt_equals_eager(arch, hf_checkpoint):
    path = str(hf_checkpoint(arch.split("-")[0], seed=2, **PROMPT_ARCHS[arch]))
    want, _ = _prompts_in_turn(path, "off", PROMPT_GROUPS, device="cuda", dtype="float32")
    got, engine = _prompts_in_turn(path, "auto", PROMPT_GROUPS, device="cuda", dtype="float32")
    prompts = engine.runner.prompts
    assert prompts.captured == 3 and prompts.failed is None and prompts.steps == 8
    assert got == want


def _overlapping(path: str, mode: str, device: str = "cpu", dtype: str = "auto") -> tuple[dict, LLMEngine]:
    """Prompts arriving while others decode (short enough for one chunk each), greedy: each one's tokens."""
    config = EngineConfig(model=path, device=device, dtype=dtype, block_size=4, num_kv_blocks=40, max_num_seqs=4,
                          max_num_batched_tokens=40, max_model_len=64, decode_graphs=mode, prefill_hold_ms=0,
                          batch_wait_ms=0)
    engine = LLMEngine.from_config(config)
    vocab = engine.model_config.vocab_size
    lengths = {0: [5], 2: [9, 3], 5: [14], 6: [1]}  # step -> prompt lengths arriving before it
    seeds = iter(range(1, 100))
    arrivals = {step: [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(next(seeds))).tolist()
                       for n in ns] for step, ns in lengths.items()}
    return _serve_arrivals(engine, arrivals, max_tokens=7), engine


def _serve_arrivals(engine: LLMEngine, arrivals: dict[int, list[list[int]]], max_tokens: int) -> dict:
    """Step the engine, adding each step's arriving prompts before it, until every request ends; greedy: each
    request's tokens."""
    got: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt in arrivals.get(step, []):
            rid = f"r{len(got)}"
            got[rid] = []
            engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens))
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        step += 1
    return got


@pytest.mark.parametrize("arch", list(PROMPT_ARCHS))
def test_decodes_beside_first_chunks_equal_eager(arch, hf_checkpoint):
    """A step of decodes and first chunks runs as a prompt replay and a decode replay: same tokens."""
    path = str(hf_checkpoint(arch.split("-")[0], seed=3, **PROMPT_ARCHS[arch]))
    want, _ = _overlapping(path, "off")
    got, padded = _overlapping(path, "padded")
    assert padded.runner.split_steps == 3  # the arrivals at steps 2, 5 and 6
    assert got == want


def test_prompt_graph_shapes():
    """Sequences padded to a batch bucket, each to a length of 16-1024, within EngineConfig.prompt_graph_tokens
    (and the step budget)."""
    from moeserve.router.cuda_graphs import PromptGraphs
    from moeserve.router.model_runner import prompt_graph_tokens

    assert prompt_graph_tokens(EngineConfig(max_num_batched_tokens=8192)) == EngineConfig().prompt_graph_tokens == 4096
    assert prompt_graph_tokens(EngineConfig(max_num_batched_tokens=512)) == 512
    graphs = PromptGraphs(None, torch.device("cpu"), max_num_seqs=64, max_tokens=1024, block_size=16,
                          pad_block=0, capture=False)
    assert graphs.shape(1, 1) == (1, 16) and graphs.shape(1, 513) == (1, 1024) and graphs.shape(1, 1025) is None
    assert graphs.shape(2, 513) is None
    assert graphs.shape(3, 100) == (4, 128) and graphs.shape(4, 200) == (4, 256)
    assert graphs.shape(16, 256) is None and graphs.shape(64, 16) == (64, 16) and graphs.shape(40, 20) is None
    plan = graphs.plan_ahead()
    assert len(plan) == 33 and plan[0] == (1, 1024) and plan[-1] == (1, 16)
    assert all(b * n <= 1024 for b, n in plan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", list(PROMPT_ARCHS))
def test_cuda_graphs_decodes_beside_first_chunks_equal_eager(arch, hf_checkpoint):
    path = str(hf_checkpoint(arch.split("-")[0], seed=3, **PROMPT_ARCHS[arch]))
    want, _ = _overlapping(path, "off", device="cuda", dtype="float32")
    got, engine = _overlapping(path, "auto", device="cuda", dtype="float32")
    assert engine.runner.split_steps == 3 and engine.runner.prompts.failed is None
    assert got == want


def test_auto_is_eager_on_cpu(hf_checkpoint):
    engine = LLMEngine.from_config(EngineConfig(model=str(hf_checkpoint("qwen3_moe", seed=1)), num_kv_blocks=16))
    assert engine.runner.graphs is None


def test_config_refuses_unknown_mode():
    with pytest.raises(ValueError, match="decode_graphs"):
        EngineConfig(decode_graphs="always")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("capture_tokens", [2048, 0])  # all captured at start-up; all on first use, mid-serving
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_cuda_graph_decode_equals_eager(arch, capture_tokens, hf_checkpoint):
    path = str(hf_checkpoint(arch, seed=1))
    want, _ = _serve(path, "off", device="cuda", dtype="float32")
    got, engine = _serve(path, "auto", device="cuda", dtype="float32", capture_tokens=capture_tokens)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.failed is None and graphs._graphs and graphs.steps > 20
    assert got == want


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_long_contexts_leave_the_fixed_shape_decode(arch, hf_checkpoint, monkeypatch):
    """A step whose padded gather would pass MAX_GATHER_BYTES is declined by the fixed-shape path and
    runs unpadded, where the reference decode attention splits its own gather into slices of
    sequences: same tokens, and both paths were taken."""
    from moeserve.kernels import reference
    from moeserve.models.layers import decode_attention

    path = str(hf_checkpoint(arch, seed=1))
    want, _ = _serve(path, "off")
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=24, block_size=4, max_model_len=96,
                                                decode_graphs="padded"))
    cache = engine.model.kv_caches()[0]
    # room for 2 sequences' 8-block bucket, not for more or longer
    monkeypatch.setattr(decode_attention, "MAX_GATHER_BYTES", decode_attention.gather_bytes(2, 32, cache))
    graphs = engine.runner.graphs
    assert graphs.supports(2, 8) and not graphs.supports(3, 8) and not graphs.supports(2, 9)
    sliced = []  # decode calls of several sequences: each is sliced, one sequence at a time
    real = reference.paged_decode_attention

    def counting(q, *args, **kwargs):
        if q.shape[0] > 1:
            sliced.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(reference, "paged_decode_attention", counting)
    monkeypatch.setattr(reference, "GATHER_BYTES", 1)
    got, padded = _serve(path, "padded")
    assert padded.runner.graphs.steps > 0 and sliced, "fixed-shape and sliced decode steps were meant to run"
    assert got == want


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_in_place_decode_attention_lifts_the_gather_bound(arch, hf_checkpoint, monkeypatch):
    """Where decode attention reads the cache in place (the GPU kernel) no gather bounds the
    fixed-shape decode: with MAX_GATHER_BYTES below any step's gather, decode steps still take it and
    give the eager engine's tokens. On the CPU the in-place check is patched to say so, and the
    padded step runs the reference, which slices its own gather."""
    from moeserve.kernels import ops
    from moeserve.models.layers import decode_attention

    path = str(hf_checkpoint(arch, seed=1))
    want, _ = _serve(path, "off")
    monkeypatch.setattr(decode_attention, "MAX_GATHER_BYTES", 1)
    monkeypatch.setattr(ops, "decode_attention_in_place", lambda device: True)
    got, padded = _serve(path, "padded")
    graphs = padded.runner.graphs
    assert graphs.supports(6, 24) and graphs.steps > 20
    assert got == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_take_contexts_past_the_gather_bound(hf_checkpoint, monkeypatch):
    """On a GPU the decode-attention kernel reads the cache in place: graphs are captured and replayed
    whatever MAX_GATHER_BYTES says, with the eager engine's tokens."""
    from moeserve.models.layers import decode_attention

    path = str(hf_checkpoint("qwen3_moe", seed=1))
    want, _ = _serve(path, "off", device="cuda", dtype="float32")
    monkeypatch.setattr(decode_attention, "MAX_GATHER_BYTES", 1)
    got, engine = _serve(path, "auto", device="cuda", dtype="float32")
    graphs = engine.runner.graphs
    assert graphs.failed is None and graphs._graphs and graphs.steps > 20
    assert got == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral-window"])
def test_cuda_graphs_with_the_fused_merge_equal_eager(arch, hf_checkpoint, monkeypatch):
    """decode_attention.FUSED_MERGE (a launch choice off by default): decode attention's splits merged by the
    last of each group through an atomic count. Captured in graphs and replayed step after step, its counts
    stay at zero between calls, and the tokens are the eager engine's (which takes the same launch)."""
    from moeserve.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "FUSED_MERGE", True)
    path = str(hf_checkpoint(arch.split("-")[0], seed=1, **PROMPT_ARCHS[arch]))
    want, _ = _serve(path, "off", device="cuda", dtype="float32")
    got, engine = _serve(path, "auto", device="cuda", dtype="float32")
    graphs = engine.runner.graphs
    assert graphs.failed is None and graphs._graphs and graphs.steps > 20
    assert got == want
    assert not any(c.any() for c in decode_attention._COUNTS[torch.device("cuda", torch.cuda.current_device())])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_with_the_fused_norms_equal_eager(hf_checkpoint, monkeypatch):
    """ops.ADD_NORM_MMA_MAX_ROWS and ops.ADD_NORM_ROUTER_MAX_TOKENS (launch choices off by default): a decoder's
    add and RMSNorm folded into the q/k/v projection of 2..16 rows and into the router's logits. In bf16
    (the kernels take 16-bit rows), captured in graphs: both kernels ran, and the tokens are those of the
    eager engine with both switches off."""
    from moeserve.kernels import gating, gemv, ops

    path = str(hf_checkpoint("qwen3_moe", seed=1))
    want, _ = _serve(path, "off", device="cuda", dtype="bfloat16")
    calls = {"mma": 0, "router": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(gemv, "add_norm_linear_mma", counted("mma", gemv.add_norm_linear_mma))
    monkeypatch.setattr(gating, "add_norm_router_logits", counted("router", gating.add_norm_router_logits))
    monkeypatch.setattr(ops, "ADD_NORM_MMA_MAX_ROWS", 16)
    monkeypatch.setattr(ops, "ADD_NORM_ROUTER_MAX_TOKENS", 16)
    got, engine = _serve(path, "auto", device="cuda", dtype="bfloat16")
    graphs = engine.runner.graphs
    assert graphs.failed is None and graphs._graphs and graphs.steps > 20
    assert calls["mma"] > 0 and calls["router"] > 0
    assert got == want


def test_start_up_plan_and_padding_rows_touch_only_the_scratch_block(hf_checkpoint):
    """The shapes captured at start-up, and the padding-only step each capture runs: it writes the
    scratch block and nothing else, so capturing ahead cannot disturb a cache in use."""
    engine = LLMEngine.from_config(EngineConfig(model=str(hf_checkpoint("qwen3_moe", seed=1)), block_size=4,
                                                num_kv_blocks=40, max_num_seqs=6, max_model_len=96,
                                                decode_graphs="padded"))
    graphs = engine.runner.graphs
    assert graphs.capture_ahead(4096) == 0  # nothing is captured without CUDA
    assert graphs.plan_ahead(0) == []
    assert graphs.plan_ahead(32) == [(b, 8) for b in (6, 4, 2, 1)]
    # contexts up to 96 tokens = 24 blocks: the 24-block bucket (the table's width), then 16, then 8
    assert graphs.plan_ahead(4096) == [(b, w) for w in (24, 16, 8) for b in (6, 4, 2, 1)]
    caches = engine.model.kv_caches()
    for c in caches:
        c.normal_()
        c[graphs.pad_block].zero_()
    before = [c[:graphs.pad_block].clone() for c in caches]
    for b, width in graphs.plan_ahead(4096):
        graphs._load(0, b, [], [], [], [], [], width)
        assert torch.isfinite(graphs._forward(b, width)).all()
    assert all(torch.equal(c[:graphs.pad_block], old) for c, old in zip(caches, before))
    assert all(c[graphs.pad_block].abs().sum() > 0 for c in caches)  # the padding rows wrote there


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_chunk_shapes_captured_ahead_touch_only_the_scratch_block(arch, hf_checkpoint):
    """Chunk graphs of GQA models are captured at start-up, in the prompt graphs' shapes; their padding-only
    step (a plan of empty chunks, zero block tables) writes the scratch block and nothing else. MLA's shapes
    carry a context width and wait for first use."""
    engine = LLMEngine.from_config(EngineConfig(model=str(hf_checkpoint(arch, seed=1)), block_size=4,
                                                num_kv_blocks=40, max_num_seqs=4, max_model_len=96,
                                                max_num_batched_tokens=64, decode_graphs="padded"))
    chunks, prompts = engine.runner.chunks, engine.runner.prompts
    assert chunks.capture_ahead() == 0  # nothing is captured without CUDA
    if chunks.pads_contexts:
        assert chunks.plan_ahead() == []
        return
    assert chunks.plan_ahead() == prompts.plan_ahead() and chunks.plan_ahead()
    caches = engine.model.kv_caches()
    for c in caches:
        c.normal_()
        c[chunks.pad_slot // chunks.block_size].zero_()
    pad_block = chunks.pad_slot // chunks.block_size
    before = [c[:pad_block].clone() for c in caches]
    for key in chunks.plan_ahead():
        chunks._load_padding(key)
        assert torch.isfinite(chunks._forward(*key)).all()
    assert all(torch.equal(c[:pad_block], old) for c, old in zip(caches, before))
    assert all(c[pad_block].abs().sum() > 0 for c in caches)


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_step_calls_ready_once_before_its_tokens(mode, hf_checkpoint):
    """LLMEngine.step(ready): called exactly once in every step that runs a batch (eager prefills and
    fixed-shape decodes alike), before that step's tokens are taken (AsyncEngine hands the previous
    step's outputs to the event loop there)."""
    engine = LLMEngine.from_config(EngineConfig(model=str(hf_checkpoint("qwen3_moe", seed=1)), block_size=4,
                                                num_kv_blocks=24, max_num_seqs=4, max_model_len=96,
                                                decode_graphs=mode))
    for i, n in enumerate((5, 9, 2)):
        engine.add_request(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=6))
    calls = []
    while engine.has_unfinished():
        engine.step(lambda: calls.append((engine.counters["steps"], engine.counters["tokens_generated"])))
    steps = engine.counters["steps"]
    assert [c[0] for c in calls] == list(range(steps))  # once per step, before the step is counted
    assert calls[-1][1] < engine.counters["tokens_generated"]  # before the last step's tokens
    if mode == "padded":
        assert engine.runner.graphs.steps > 0


def _with_cached_prefixes(path: str, mode: str, device: str = "cpu", dtype: str = "auto") -> tuple[dict, LLMEngine]:
    """Prompts after cached prefixes, arriving while others decode: ones sharing an earlier prompt's first 20
    tokens (prefix-cache hits: a chunk of 2-9 new tokens), one whose whole prompt but its last token is cached
    (a one-token chunk: a decode row), and a 54-token prompt past the 40-token step budget (its later chunk
    follows the first). Greedy: each one's tokens."""
    config = EngineConfig(model=path, device=device, dtype=dtype, block_size=4, num_kv_blocks=60, max_num_seqs=4,
                          max_num_batched_tokens=40, max_model_len=64, decode_graphs=mode, prefill_hold_ms=0,
                          batch_wait_ms=0)
    engine = LLMEngine.from_config(config)
    vocab = engine.model_config.vocab_size

    def tokens(n: int, seed: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

    base = tokens(20, 7)
    arrivals = {0: [base + tokens(5, 1)], 3: [base + tokens(9, 2), tokens(54, 3)], 6: [base + tokens(2, 4)],
                9: [base + tokens(5, 1)[:4]], 12: [base + tokens(7, 5), base + tokens(3, 6)]}
    return _serve_arrivals(engine, arrivals, max_tokens=6), engine


@pytest.mark.parametrize("arch", list(PROMPT_ARCHS))
def test_chunks_after_cached_prefixes_equal_eager(arch, hf_checkpoint, monkeypatch):
    """Chunks after a cached prefix run padded (ChunkGraphs), alone and beside decodes and first chunks: GQA
    through the kernel's plan (read back on the CPU), MLA as one padded call over contexts of a fixed width,
    masked by the plan's lengths (that path itself runs here). Same tokens as the eager engine."""
    path = str(hf_checkpoint(arch.split("-")[0], seed=4, **PROMPT_ARCHS[arch]))
    want, eager = _with_cached_prefixes(path, "off")
    assert eager.stats()["prefix_cache_hit_tokens"] >= 5 * 20
    got, padded = _with_cached_prefixes(path, "padded")
    chunks = padded.runner.chunks
    assert chunks is not None and chunks.steps >= 4 and padded.runner.split_steps > 0
    assert chunks.pads_contexts == arch.startswith("deepseek")
    assert got == want
    if chunks.pads_contexts:  # widths: the longest table's blocks up to a power of two; none past the bounds
        assert [chunks.shape(2, 9, blocks) for blocks in (1, 3, 4)] == [(2, 16, 1), (2, 16, 4), (2, 16, 4)]
        heads = padded.runner.model.config.num_attention_heads
        monkeypatch.setattr(padded_attention, "MAX_SCORE_ELEMENTS", 2 * 16 * 4 * heads)  # one block of 4 keys each
        assert chunks.shape(2, 9, 1) is not None and chunks.shape(2, 9, 2) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral-window", "deepseek_v2"])
def test_cuda_graphs_chunks_after_cached_prefixes_equal_eager(arch, hf_checkpoint):
    """The same on a GPU: chunk steps captured (GQA's at start-up, MLA's on first use) and replayed, reading their
    plan from the graph's buffer (GQA's kernel; MLA's mask and layout); same tokens as the eager engine."""
    path = str(hf_checkpoint(arch.split("-")[0], seed=4, **PROMPT_ARCHS[arch]))
    want, _ = _with_cached_prefixes(path, "off", device="cuda", dtype="float32")
    got, engine = _with_cached_prefixes(path, "auto", device="cuda", dtype="float32")
    chunks = engine.runner.chunks
    assert chunks is not None and chunks.failed is None and chunks.captured >= 1 and chunks.steps >= 4
    assert got == want
