"""Paged decode attention: the Triton kernel against kernels/reference.py, and the reference against
plain per-sequence softmax attention over each sequence's own rows."""

import math

import pytest
import torch
from kernel_cases import DEVICE, ON_GPU, gpu, rel_err, row_errs

from moeserve.kernels import decode_attention
from moeserve.kernels import reference as ref


def _problem(gen, lens, hq, hk, dk, dv, page, dtype, mla=False, spare_blocks=3):
    """Random q and caches with each sequence's blocks scattered through the cache (shuffled ids)."""
    b = len(lens)
    per_seq = [math.ceil(n / page) for n in lens]
    num_blocks = sum(per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen, device=DEVICE).int()
    width = max(per_seq)
    tables = torch.zeros(b, width, dtype=torch.int32, device=DEVICE)
    at = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[at:at + n]
        at += n
    q = torch.randn(b, hq, dk, generator=gen, device=DEVICE).to(dtype)
    if mla:  # one latent "head": keys the whole row, values its leading dv columns (a view)
        cache = torch.randn(num_blocks, page, 1, dk, generator=gen, device=DEVICE).to(dtype)
        k_cache, v_cache = cache, cache[..., :dv]
    else:
        k_cache = torch.randn(num_blocks, page, hk, dk, generator=gen, device=DEVICE).to(dtype)
        v_cache = torch.randn(num_blocks, page, hk, dv, generator=gen, device=DEVICE).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, tables, lens_t


def _naive(q, k_cache, v_cache, tables, lens, scale, window=None):
    """Sequence by sequence, head by head, in float64: the plain definition."""
    b, hq, _ = q.shape
    page, hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(b, hq, v_cache.shape[-1], dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        slots = [int(tables[i, p // page]) * page + p % page for p in range(n)]
        keep = slots[-window:] if window else slots
        keys = k_cache.reshape(-1, hk, k_cache.shape[-1])[keep].double().cpu()
        values = v_cache.reshape(-1, hk, v_cache.shape[-1])[keep].double().cpu()
        for h in range(hq):
            kh = h // (hq // hk)
            w = torch.softmax(keys[:, kh] @ q[i, h].double().cpu() * scale, dim=0)
            out[i, h] = w @ values[:, kh]
    return out


CASES = [  # (context lengths, Hq, Hk, Dk, Dv, page, mla)
    ([1], 4, 4, 32, 32, 16, False),  # one sequence, one cached row
    ([5, 17, 33, 64], 8, 2, 32, 32, 16, False),  # GQA; lengths off the page and tile sizes
    ([300, 7, 129], 16, 4, 64, 64, 16, False),  # long context: several splits
    ([40, 1, 90], 6, 2, 16, 16, 8, False),  # group of 3 (not a power of two), small pages
    ([3, 70, 200], 16, 1, 48, 32, 16, True),  # MLA: 32 latent + 16 rope dims, values from the keys
    ([50, 12], 40, 1, 48, 32, 16, True),  # MLA with more heads than one head block
    ([3, 20], 4, 1, 40, 32, 16, True),  # the test checkpoints' MLA: 8 rope dims, a tile padded to 16
    ([5, 9], 4, 2, 8, 8, 16, False),  # heads narrower than a dot's 16: keys and values padded
    ([900, 40], 4, 1, 16, 16, 16, False),  # 29 splits: the merge takes them in two tiles
]


@pytest.mark.parametrize("lens,hq,hk,dk,dv,page,mla", CASES)
def test_kernel_matches_reference(lens, hq, hk, dk, dv, page, mla, gen):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, kc, vc, tables, lens_t = _problem(gen, lens, hq, hk, dk, dv, page, dtype, mla)
    scale = dk ** -0.5
    got = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, scale, max(lens))
    want = ref.paged_decode_attention(q, kc, vc, tables, lens_t, scale, max(lens))
    assert got.shape == (len(lens), hq, dv) and got.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(got, want) < tol
    assert (row_errs(got.flatten(0, 1), want.flatten(0, 1)) < 3 * tol).all()


@pytest.mark.parametrize("lens,hq,hk,dk,dv,mla", [([1, 40, 300, 33], 8, 2, 32, 32, False),
                                                 ([3, 70, 200], 16, 1, 48, 32, True),
                                                 ([320], 32, 4, 128, 128, False), ([320], 16, 1, 576, 512, True)])
def test_settled_reads_the_new_rows_after_the_wait(lens, hq, hk, dk, dv, mla, gen):
    """settled=True as a decode step calls it: the kernel launched just before writes each sequence's
    last row (the step's new token). The kernel reads the older rows before its PDL wait and the last
    row after it, so the new rows count, not the stale ones; empty splits of a padded launch length
    stay empty; and a sliding window still applies."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, kc, vc, tables, lens_t = _problem(gen, lens, hq, hk, dk, dv, 16, dtype, mla)
    page = kc.shape[1]
    tables = torch.cat([tables, tables.new_zeros(len(lens), 512 // page - tables.shape[1])], 1)  # a graph's width
    last = torch.tensor([int(tables[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(lens)],
                        device=DEVICE)
    fresh_k = torch.randn(len(lens), hk, dk, generator=gen, device=DEVICE).to(dtype) * 3
    fresh_v = torch.randn(len(lens), hk, dv, generator=gen, device=DEVICE).to(dtype) * 3
    for window, max_len in ((None, max(lens)), (None, 512), (17, max(lens))):
        kc.view(-1, hk, dk).index_copy_(0, last, fresh_k)  # the kernel just before writes the new rows
        if not mla:
            vc.view(-1, hk, dv).index_copy_(0, last, fresh_v)
        got = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, dk ** -0.5, max_len, window,
                                                      settled=True)
        want = ref.paged_decode_attention(q, kc, vc, tables, lens_t, dk ** -0.5, max_len, window)
        assert rel_err(got, want) < (1e-2 if ON_GPU else 1e-5), (window, max_len)
        if window is None:
            unsettled = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, dk ** -0.5, max_len)
            assert torch.equal(got, unsettled)  # the same arithmetic, only the reads move
        fresh_k, fresh_v = fresh_k.flip(0), fresh_v.flip(0)


def test_padded_shape_and_sliding_window(gen):
    """A launch shape longer than every context (the CUDA-graph case: splits past the end stay
    empty) and a sliding window that drops the oldest rows."""
    lens = [9, 60, 33]
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, kc, vc, tables, lens_t = _problem(gen, lens, 8, 2, 32, 32, 16, dtype, spare_blocks=20)
    width = math.ceil(256 / 16)
    tables = torch.cat([tables, torch.zeros(3, width - tables.shape[1], dtype=torch.int32, device=DEVICE)], 1)
    for window in (None, 20):
        got = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, 0.2, 256, window)
        want = ref.paged_decode_attention(q, kc, vc, tables, lens_t, 0.2, 256, window)
        assert rel_err(got, want) < (1e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("window", [None, 10])
def test_reference_is_plain_attention(window, gen):
    lens = [1, 23, 48]
    q, kc, vc, tables, lens_t = _problem(gen, lens, 6, 2, 16, 8, 8, torch.float64 if not ON_GPU else torch.float32)
    got = ref.paged_decode_attention(q, kc, vc, tables, lens_t, 0.3, max(lens), window)
    want = _naive(q, kc, vc, tables, lens_t, 0.3, window)
    assert rel_err(got, want) < 1e-6


def test_splits_depend_on_shape_only():
    """Small batches split long contexts to fill the GPU; large batches of short ones do not."""
    assert decode_attention.plan_splits(1, 4, 4096, 32)[0] > 1
    assert decode_attention.plan_splits(64, 8, 256, 32)[0] == 1
    splits, chunk = decode_attention.plan_splits(3, 1, 1000, 16)
    assert chunk % 16 == 0 and (splits - 1) * chunk < 1000 <= splits * chunk


def test_default_launch_by_programs_a_split():
    """GQA heads: short splits while the batch leaves the GPU idle, from 256 programs a split one split per 512
    positions (contexts up to 512 in one program, no merge); MLA's launch whatever the batch."""
    da = decode_attention
    assert da.default_launch(128, 128) == da.default_launch(128, 128, 255) == da.Launch(32, 4, 3, 528)
    assert da.default_launch(128, 128, 256) == da.default_launch(128, 128, 4096) == da.Launch(64, 8, 3, 528, 512)
    assert {da.default_launch(576, 512, n) for n in (1, 256, 1024)} == {da.Launch(32, 4, 2, 132)}
    assert da.plan_splits(64 * 4, 1, 512, 64, 528, 512) == (1, 512)  # a graph's bucket of 512: one split
    assert da.plan_splits(64 * 4, 1, 2048, 64, 528, 512)[0] == 3  # longer: splits of 512 or more, ~528 programs


def test_min_chunk_bounds_the_splits():
    """min_chunk: every split takes that many positions or more, so a short context is one split
    (whose program writes the output itself) while a long one still splits."""
    assert decode_attention.plan_splits(1, 4, 320, 32)[0] == 10
    assert decode_attention.plan_splits(1, 4, 320, 32, min_chunk=512) == (1, 320)
    splits, chunk = decode_attention.plan_splits(1, 4, 4096, 32, min_chunk=512)
    assert splits == 8 and chunk == 512
    assert decode_attention.plan_splits(1, 4, 4096, 32, min_chunk=100)[0] == 32  # 4 tiles (128) a split


@gpu
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v2-lite"])
@pytest.mark.parametrize("batch", [1, 64])
def test_real_shapes_on_gpu(model, batch, gen):
    """Qwen3-30B-A3B (32 query heads over 4 KV heads of 128) and DeepSeek-V2-Lite's latent (16 heads
    over 512 + 64 dims) in bf16, contexts up to 1200 tokens."""
    lens = torch.randint(1, 1200, (batch,), generator=gen, device=DEVICE).tolist()
    if model == "qwen3-30b-a3b":
        args = (32, 4, 128, 128, 16, False)
    else:
        args = (16, 1, 576, 512, 16, True)
    q, kc, vc, tables, lens_t = _problem(gen, lens, *args[:-2], args[-2], torch.bfloat16, args[-1])
    got = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, 0.1, max(lens))
    want = ref.paged_decode_attention(q, kc, vc, tables, lens_t, 0.1, max(lens))
    assert rel_err(got, want) < 1e-2


def test_many_splits_are_merged_in_tiles():
    """The case above that needs more than one merge tile does (the merge reads 16 splits at a time)."""
    assert decode_attention.plan_splits(2, 1, 900, 32)[0] > 16


@gpu
@pytest.mark.parametrize("mla", [False, True])
def test_step_shapes_compile_no_new_variant(mla, gen):
    """Eager steps differ in batch size, table width and number of splits (1, a multiple of 16, any
    other); none of that compiles a new variant of either kernel, which would stall a serving step for
    hundreds of milliseconds (seen in a benchmark's eager prefill steps before these arguments were
    left unspecialised)."""
    args = (16, 1, 576, 512, 16) if mla else (32, 4, 128, 128, 16)
    kernels = (decode_attention._split_kernel, decode_attention._merge_kernel)

    def variants():
        return [sum(len(cache[0]) for cache in k.device_caches.values()) for k in kernels]

    seen = []
    for lens in ([5], [1200], [17, 300, 33], [64] * 64, [100] * 7, [16 * 33] * 16):
        q, kc, vc, tables, lens_t = _problem(gen, lens, *args, torch.bfloat16, mla)
        got = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, 0.1, max(lens))
        want = ref.paged_decode_attention(q, kc, vc, tables, lens_t, 0.1, max(lens))
        assert rel_err(got, want) < 1e-2
        seen.append(variants())
    assert seen[-1] == seen[0], seen


@gpu
@pytest.mark.parametrize("hq,hk,dk,dv,mla", [(32, 4, 128, 128, False), (16, 1, 576, 512, True)])
def test_bf16_scores_stay_float32_with_large_logits(hq, hk, dk, dv, mla, gen):
    """Logits in the hundreds: a bf16 score product would lose several %; the kernel's dots
    accumulate in float32 and the result stays within bf16 rounding of the float64 definition.
    (GPU only: Triton 3.9's interpreter computes bf16 dots wrongly, so CPU cases run in float32.)"""
    lens = [200, 17, 120]
    q, kc, vc, tables, lens_t = _problem(gen, lens, hq, hk, dk, dv, 16, torch.bfloat16, mla)
    q = (q.float() * 8).bfloat16()
    kc = (kc.float() * 8).bfloat16()
    vc = kc[..., :dv] if mla else vc
    got = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, dk ** -0.5, max(lens))
    want = _naive(q, kc, vc, tables, lens_t, dk ** -0.5)
    assert rel_err(got, want) < 1e-2


def test_compiles_for_hopper(gen):
    """Every specialisation the wrapper launches for the shapes above and the real models' (Qwen3-30B-A3B's
    heads, DeepSeek-V2's latent), recorded from interpreter runs, compiles for sm_90: in bfloat16 and
    float32 (the GPU tests' tiny models), with int32 and int64 lengths (eager steps, CUDA graphs). The
    interpreter checks values, not types or a dot's minimum width."""
    from hopper_compile import LaunchRecorder, compile_for_hopper

    from moeserve.kernels import launch

    if not launch.interpreting():
        pytest.skip("records the interpreter's launches; on a GPU the kernel tests run them")
    real = [([3], 32, 4, 128, 128, 16, False), ([3], 16, 1, 576, 512, 16, True),
            ([2] * 64, 32, 4, 128, 128, 16, False)]  # 256 programs a split: default_launch's long splits
    with LaunchRecorder() as rec:
        for i, (lens, hq, hk, dk, dv, page, mla) in enumerate(CASES + real):
            for dtype in (torch.bfloat16, torch.float32) if i >= len(CASES) - 2 else (torch.bfloat16,):
                q, kc, vc, tables, lens_t = _problem(gen, lens, hq, hk, dk, dv, page, dtype, mla)
                for lens_type in (torch.int32, torch.int64):
                    decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t.to(lens_type), 0.1, max(lens),
                                                            settled=i >= len(CASES))  # as decode steps may
        for lens, hq, hk, dk, dv, page, mla in real[:2]:  # the splits merged by the last of them (a launch choice)
            q, kc, vc, tables, lens_t = _problem(gen, [40], hq, hk, dk, dv, page, torch.bfloat16, mla)
            decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, 0.1, 40, settled=True,
                                                    launch=decode_attention.Launch(16, 4, 2, 528, fused_merge=True))
    assert compile_for_hopper(rec.jobs()) == {}


def test_fused_merge_leaves_its_counts_at_zero(gen):
    """fused_merge: the last split of each group merges and puts its count back to zero, so calls one after
    another (layers, steps, graph replays) find zeros; the result is the merge launch's, call after call, for
    contexts of several splits, of one, and empty splits past a short context."""
    lens = [5, 70, 33, 1]
    q, kc, vc, tables, lens_t = _problem(gen, lens, 8, 2, 32, 32, 16, torch.float32)
    plain = decode_attention.Launch(16, 4, 1, 528)
    fused = decode_attention.Launch(16, 4, 1, 528, fused_merge=True)
    want = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, 0.2, 70, launch=plain)
    for _ in range(3):
        got = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, 0.2, 70, launch=fused)
        assert rel_err(got, want) < (2e-2 if ON_GPU else 1e-5)
        assert not decode_attention._COUNTS[q.device][-1].any()


@pytest.mark.parametrize("launch", [decode_attention.Launch(16, 4, 1, 132), decode_attention.Launch(64, 8, 3, 528),
                                    decode_attention.Launch(32, 4, 2, 528, min_chunk=4096),
                                    decode_attention.Launch(64, 8, 3, 528, min_chunk=512),
                                    decode_attention.Launch(16, 4, 1, 528, fused_merge=True),
                                    decode_attention.Launch(32, 4, 3, 528, fused_merge=True)])
def test_other_launches_give_the_same_attention(launch, gen):
    """The launch choices benchmarks/bench_decode_attention.py times (rows per step, warps, stages,
    programs aimed for, positions a split takes at least, hence the split count) compute the same
    attention, MLA's latent rows included; min_chunk=4096 makes every case one split, written without
    the merge."""
    for lens, hq, hk, dk, dv, mla in (([5, 70, 33], 8, 2, 32, 32, False), ([40, 3], 16, 1, 48, 32, True)):
        dtype = torch.bfloat16 if ON_GPU else torch.float32
        q, kc, vc, tables, lens_t = _problem(gen, lens, hq, hk, dk, dv, 16, dtype, mla)
        got = decode_attention.paged_decode_attention(q, kc, vc, tables, lens_t, 0.2, max(lens), launch=launch)
        want = ref.paged_decode_attention(q, kc, vc, tables, lens_t, 0.2, max(lens))
        assert rel_err(got, want) < (2e-2 if ON_GPU else 1e-5)
