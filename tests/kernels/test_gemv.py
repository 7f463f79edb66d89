"""The decode-size GEMV (kernels/gemv.py) against a float64 reference, and ops.linear's choice."""

import pytest
import torch
from kernel_cases import DEVICE, ON_GPU, gpu, rel_err, row_errs

from moeserve.kernels import gemv, ops

# bf16 operands, float32 accumulation, one bf16 rounding of the output: ~2e-3 relative
TOL = 1e-2


def _problem(m, n, k, gen, dtype=torch.bfloat16, bias=False):
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if bias else None
    return x, w, b


def _want(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


CASES = [  # (rows, N, K): one row and a batch; N and K not multiples of the tiles; K not a power of two
    (1, 64, 32),
    (3, 37, 96),
    (8, 130, 200),
    (1, 5, 1000),  # few outputs, a wide row: one program
]

MMA_CASES = [  # (rows, N, K) of the tensor-core form: 2..16 rows; N and K not multiples of the tiles
    (2, 64, 32),
    (5, 37, 300),
    (16, 130, 512),
    (9, 16, 1000),
]


@pytest.mark.parametrize("linear,m,n,k",
                         [(gemv.linear, *c) for c in CASES] + [(gemv.linear_mma, *c) for c in MMA_CASES])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(linear, m, n, k, bias, gen):
    x, w, b = _problem(m, n, k, gen, bias=bias)
    got = linear(x, w, b)
    assert got.shape == (m, n) and got.dtype == x.dtype
    assert rel_err(got, _want(x, w, b)) < TOL
    assert (row_errs(got, _want(x, w, b)) < 3 * TOL).all()


def test_gemv_half_and_strided_rows(gen):
    """fp16, and rows of x taken from a wider tensor (a row stride larger than K)."""
    wide = torch.randn(4, 160, generator=gen, device=DEVICE).half()
    x = wide[:, :128]
    w = (torch.randn(48, 128, generator=gen, device=DEVICE) / 128**0.5).half()
    assert rel_err(gemv.linear(x, w), _want(x, w, None)) < TOL


def test_gemv_rows_do_not_depend_on_the_batch(gen):
    """Each row is computed alone and in one order: a row's output is the same bits in a call of 8
    rows (a CUDA graph padded to 8) as alone (an eager step of one)."""
    x, w, b = _problem(8, 96, 256, gen, bias=True)
    together = gemv.linear(x, w, b)
    for i in range(8):
        assert torch.equal(gemv.linear(x[i:i + 1], w, b), together[i:i + 1])


@pytest.mark.parametrize("linear,max_rows", [(gemv.linear, gemv.MAX_ROWS), (gemv.linear_mma, gemv.MMA_ROWS)])
def test_gemv_refuses_what_it_does_not_take(linear, max_rows, gen):
    """The GEMV and its tensor-core form: too many rows, 32-bit floats, a weight of another width."""
    w = torch.zeros(16, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        linear(torch.zeros(max_rows + 1, 64, dtype=torch.bfloat16, device=DEVICE), w)
    with pytest.raises(ValueError, match="16-bit"):
        linear(torch.zeros(2, 64, device=DEVICE), w.float())
    with pytest.raises(ValueError, match="weight"):
        linear(torch.zeros(2, 32, dtype=torch.bfloat16, device=DEVICE), w)


def test_ops_linear_is_f_linear_off_the_gpu(gen):
    """The CPU path (the HF oracle's) is F.linear itself, bit for bit, whatever the size."""
    if ON_GPU:
        pytest.skip("on a GPU ops.linear takes the kernel at decode sizes")
    for m in (1, 8, 40):
        x, w, b = _problem(m, 24, 32, gen, dtype=torch.float32, bias=True)
        assert torch.equal(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))


def test_gemv_compiles_for_hopper(gen):
    """The launches above (bf16 and fp16, with and without bias, with the add and norm) compile for
    sm_90 with PDL."""
    from moeserve.kernels import launch

    if not launch.interpreting():
        pytest.skip("records the interpreter's launches; on a GPU the kernel tests run them")
    from hopper_compile import LaunchRecorder, compile_for_hopper

    with LaunchRecorder() as rec:
        for dtype in (torch.bfloat16, torch.float16):
            for bias in (False, True):
                x, w, b = _problem(3, 40, 2048, gen, dtype=dtype, bias=bias)
                gemv.linear(x, w, b)
            gemv.add_norm_linear(x[:1], x[1:2], x[2], 1e-6, w)  # with the add and the norm
    jobs = rec.jobs()
    assert {j.kernel for j in jobs} == {"_gemv_kernel"} and len(jobs) == 6
    assert compile_for_hopper(jobs) == {}


@gpu
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("n,k", [(5120, 2048), (2048, 4096), (3648, 2048), (2048, 2816)])
def test_gemv_real_shapes_on_gpu(m, n, k, gen):
    """The projections it serves: Qwen3-30B-A3B's q/k/v and o_proj, DeepSeek-V2-Lite's q + kv_a and
    its shared experts' down projection; and ops.linear takes the kernel for them at decode sizes."""
    x, w, b = _problem(m, n, k, gen)
    got = gemv.linear(x, w, b)
    assert rel_err(got, _want(x, w, b)) < TOL
    assert (row_errs(got, _want(x, w, b)) < 3 * TOL).all()
    # ops.linear takes the kernel up to LINEAR_GEMV_MAX_ROWS rows, its tensor-core form to LINEAR_MMA_MAX_ROWS
    if m <= ops.LINEAR_GEMV_MAX_ROWS:
        want = got
    elif m <= ops.LINEAR_MMA_MAX_ROWS and n <= ops.LINEAR_MMA_MAX_N and k <= ops.LINEAR_MMA_MAX_K:
        want = gemv.linear_mma(x, w)
    else:
        want = torch.nn.functional.linear(x, w)
    assert torch.equal(ops.linear(x, w), want)
    assert torch.equal(ops.linear(x.float(), w.float()), torch.nn.functional.linear(x.float(), w.float()))


@pytest.mark.parametrize("n,k,bias", [(64, 32, False), (37, 200, True), (5, 1000, False)])
def test_add_norm_linear_is_the_add_the_norm_and_the_projection(n, k, bias, gen):
    """One row: the decoder's add and RMSNorm folded into the GEMV equal ops.add_rms_norm followed by
    the projection (the same sum bits; the output within the GEMV's tolerance of float64 over the
    reference's normed row), and the sum is written once whatever the number of programs."""
    from moeserve.kernels import reference

    x, w, b = _problem(1, n, k, gen, bias=bias)
    residual = torch.randn(1, k, generator=gen, device=DEVICE).to(x.dtype) * 4
    norm_weight = (1 + torch.randn(k, generator=gen, device=DEVICE) / 4).to(x.dtype)
    y, total = gemv.add_norm_linear(x, residual, norm_weight, 1e-6, w, b)
    h, want_total = reference.add_rms_norm(x, residual, norm_weight, 1e-6)
    assert torch.equal(total, want_total)
    assert rel_err(y, _want(h, w, b)) < TOL
    got, got_total = ops.add_rms_norm_linear(x, residual, norm_weight, 1e-6, w, b)
    assert torch.equal(got_total, want_total)
    if ON_GPU:  # the kernel; on the CPU the reference's two calls
        assert torch.equal(got, y)
    else:
        assert torch.equal(got, torch.nn.functional.linear(h, w, b))


@pytest.mark.parametrize("fused,rows", [(gemv.add_norm_linear, 1), (gemv.add_norm_linear_mma, gemv.MMA_ROWS)])
def test_add_norm_linear_refuses_what_it_does_not_take(fused, rows, gen):
    """More rows than the kernel takes, a norm weight or a residual that do not match x: a message that says so."""
    x, w, _ = _problem(rows + 1, 16, 64, gen)
    norm_weight = torch.ones(64, dtype=x.dtype, device=DEVICE)
    with pytest.raises(ValueError, match="one row" if rows == 1 else f"1..{rows} rows"):
        fused(x, x, norm_weight, 1e-6, w)
    with pytest.raises(ValueError, match="norm weight"):
        fused(x[:1], x[:1], norm_weight.float(), 1e-6, w)
    with pytest.raises(ValueError, match="residual"):
        fused(x[:1], x[:2], norm_weight, 1e-6, w)


@pytest.mark.parametrize("m,n,k,bias", [(2, 64, 32, False), (5, 37, 300, True), (16, 130, 512, False)])
def test_add_norm_linear_mma_is_the_add_the_norm_and_the_projection(m, n, k, bias, gen, monkeypatch):
    """2..16 rows on tensor cores: the add and RMSNorm folded in equal ops.add_rms_norm followed by the
    projection (the sums' bits; the output within tolerance of float64 over the reference's normed rows, its
    sum of squares taken tile by tile), the sums written once whatever the number of programs; rows do not
    depend on the batch. ops.add_rms_norm_linear takes it up to ADD_NORM_MMA_MAX_ROWS rows (0: never)."""
    from moeserve.kernels import reference

    x, w, b = _problem(m, n, k, gen, bias=bias)
    residual = torch.randn(m, k, generator=gen, device=DEVICE).to(x.dtype) * 4
    norm_weight = (1 + torch.randn(k, generator=gen, device=DEVICE) / 4).to(x.dtype)
    y, total = gemv.add_norm_linear_mma(x, residual, norm_weight, 1e-6, w, b)
    h, want_total = reference.add_rms_norm(x, residual, norm_weight, 1e-6)
    assert torch.equal(total, want_total)
    assert rel_err(y, _want(h, w, b)) < TOL
    one, _ = gemv.add_norm_linear_mma(x[:1], residual[:1], norm_weight, 1e-6, w, b)
    assert torch.equal(one, y[:1])
    for rows in (0, 16):
        monkeypatch.setattr(ops, "ADD_NORM_MMA_MAX_ROWS", rows)
        got, got_total = ops.add_rms_norm_linear(x, residual, norm_weight, 1e-6, w, b)
        assert torch.equal(got_total, want_total)
        if ON_GPU and rows:  # the fused kernel; else the norm and then the projection (the reference's on the CPU)
            assert torch.equal(got, y)
        elif not ON_GPU:
            assert torch.equal(got, torch.nn.functional.linear(h, w, b))


@pytest.mark.parametrize("launch", [(16, 64, 4, 3), (32, 128, 4, 4), (64, 128, 4, 4)])
def test_linear_mma_launches_agree(launch, gen):
    """Other tiles (the benchmark's sweep): the same products within tolerance; fp16 and rows of x
    taken from a wider tensor."""
    wide = torch.randn(6, 400, generator=gen, device=DEVICE).half()
    x = wide[:, :320]
    w = (torch.randn(70, 320, generator=gen, device=DEVICE) / 320**0.5).half()
    got = gemv.linear_mma(x, w, launch=launch)
    assert rel_err(got, _want(x, w, None)) < TOL


def test_linear_mma_rows_do_not_depend_on_the_batch(gen):
    """A row's output is the same bits in a call of 16 rows (a CUDA graph padded to 16) as alone or
    among 7 (an eager step of fewer)."""
    x, w, b = _problem(16, 96, 320, gen, bias=True)
    together = gemv.linear_mma(x, w, b)
    assert torch.equal(gemv.linear_mma(x[:7], w, b), together[:7])
    for i in (0, 9, 15):
        assert torch.equal(gemv.linear_mma(x[i:i + 1], w, b), together[i:i + 1])


def test_linear_mma_compiles_for_hopper(gen):
    """The launches ops.linear makes (bf16 and fp16, with and without bias, K a multiple of the tile
    and not), and the fused add and norm, compile for sm_90 with PDL."""
    from moeserve.kernels import launch

    if not launch.interpreting():
        pytest.skip("records the interpreter's launches; on a GPU the kernel tests run them")
    from hopper_compile import LaunchRecorder, compile_for_hopper

    with LaunchRecorder() as rec:
        for dtype in (torch.bfloat16, torch.float16):
            for bias, n, k in ((False, 40, 2048), (True, 4096, 300)):  # both launches of mma_launch
                x, w, b = _problem(3, n, k, gen, dtype=dtype, bias=bias)
                gemv.linear_mma(x, w, b)
        x, w, _ = _problem(3, 5120, 2048, gen)  # with the add and the norm (Qwen3-30B-A3B's q/k/v)
        gemv.add_norm_linear_mma(x, x, x[0], 1e-6, w)
    jobs = rec.jobs()
    assert {j.kernel for j in jobs} == {"_mma_kernel"} and len(jobs) == 5
    assert compile_for_hopper(jobs) == {}
