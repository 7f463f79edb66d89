"""Triton RMSNorm and rotary embedding against kernels/reference.py (the models' CPU path)."""

import pytest
import torch
from kernel_cases import DEVICE, ON_GPU, gpu, rel_err, row_errs

from moeserve.kernels import norm_rope
from moeserve.kernels import reference as ref

DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter's bf16 arithmetic is not trusted
TOL = 1e-2 if ON_GPU else 1e-5


@pytest.mark.parametrize("shape", [(1, 64), (37, 48), (5, 4, 16), (0, 32)])
def test_rms_norm(shape, gen):
    x = (torch.randn(*shape, generator=gen, device=DEVICE) * 3).to(DTYPE)
    w = (torch.rand(shape[-1], generator=gen, device=DEVICE) + 0.5).to(DTYPE)
    got = norm_rope.rms_norm(x, w, 1e-6)
    want = ref.rms_norm(x, w, 1e-6)
    assert got.shape == want.shape and got.dtype == want.dtype
    if x.numel():
        assert rel_err(got, want) < TOL
        assert (row_errs(got.reshape(-1, shape[-1]), want.reshape(-1, shape[-1])) < 3 * TOL).all()


def test_rms_norm_of_a_strided_view(gen):
    """MLA normalises the latent part of a wider row (a view whose rows are not contiguous)."""
    wide = torch.randn(9, 48, generator=gen, device=DEVICE).to(DTYPE)
    latent = wide[:, :32]
    w = torch.rand(32, generator=gen, device=DEVICE).to(DTYPE)
    assert rel_err(norm_rope.rms_norm(latent, w, 1e-5), ref.rms_norm(latent, w, 1e-5)) < TOL


@pytest.mark.parametrize("t,heads,dim", [(1, 1, 16), (13, 3, 32), (6, 8, 64)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary(t, heads, dim, interleaved, gen):
    x = torch.randn(t, heads, dim, generator=gen, device=DEVICE).to(DTYPE)
    angles = torch.rand(t, dim // 2, generator=gen, device=DEVICE) * 100
    cos, sin = angles.cos(), angles.sin()
    got = norm_rope.apply_rotary(x, cos, sin, interleaved)
    want = ref.apply_rotary(x, cos, sin, interleaved)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) < TOL


def test_rotary_of_a_split_view(gen):
    """MLA rotates the rope part of each head, a view into the wider q rows."""
    q = torch.randn(7, 4, 48, generator=gen, device=DEVICE).to(DTYPE)
    q_pe = q.split([32, 16], dim=-1)[1]
    angles = torch.rand(7, 8, generator=gen, device=DEVICE) * 10
    got = norm_rope.apply_rotary(q_pe, angles.cos(), angles.sin(), True)
    assert rel_err(got, ref.apply_rotary(q_pe, angles.cos(), angles.sin(), True)) < TOL


@gpu
@pytest.mark.parametrize("d", [128, 512, 1536, 2048, 7168])
def test_rms_norm_real_widths_bf16(d, gen):
    """Head (q/k norm), latent, q_lora and hidden widths, 8192 rows: the same bf16 values as the
    reference but for rare last-bit differences of the float32 sum's order."""
    x = torch.randn(8192, d, generator=gen, device=DEVICE).bfloat16()
    w = (torch.rand(d, generator=gen, device=DEVICE) + 0.5).bfloat16()
    got, want = norm_rope.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)
    assert (got != want).float().mean() < 1e-3
    assert rel_err(got, want) < 1e-3


@pytest.mark.parametrize("t,hq,hk,dim", [(1, 4, 2, 16), (13, 6, 2, 32), (5, 2, 2, 64)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_rope_and_cache(t, hq, hk, dim, interleaved, norm, gen):
    """q/k norms, rotary and cache writes in one launch, against the reference's separate steps: the
    same q, the same cache contents (slots written, every other slot untouched)."""
    q = (torch.randn(t, hq + 2 * hk, dim, generator=gen, device=DEVICE) * 3).to(DTYPE)
    q, k, v = q[:, :hq], q[:, hq:hq + hk], q[:, hq + hk:]  # views of one projection, rows strided
    angles = torch.rand(t, dim // 2, generator=gen, device=DEVICE) * 100
    cos, sin = angles.cos(), angles.sin()
    weights = [(torch.rand(dim, generator=gen, device=DEVICE) + 0.5).to(DTYPE) for _ in range(2)] if norm else []
    blocks, block_size = 5, 4
    slots = torch.randperm(blocks * block_size, generator=torch.Generator().manual_seed(t))[:t].to(DEVICE)
    caches = [torch.full((blocks, block_size, hk, dim), 7.0, device=DEVICE).to(DTYPE) for _ in range(4)]
    got = norm_rope.rope_and_cache(q, k, v, cos, sin, interleaved, caches[0], caches[1], slots, *weights, eps=1e-6)
    want = ref.rope_and_cache(q, k, v, cos, sin, interleaved, caches[2], caches[3], slots, *weights, eps=1e-6)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    assert rel_err(got, want) < TOL
    for mine, theirs in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert rel_err(mine, theirs) < TOL
        untouched = torch.ones(blocks * block_size, dtype=torch.bool, device=DEVICE)
        untouched[slots] = False
        assert (mine.view(-1, hk, dim)[untouched] == 7.0).all()
    assert torch.equal(caches[1], caches[3])  # values are copied, not computed


def test_compiles_for_hopper():
    """As the models call them in bf16 (hidden and head widths, both rotary layouts), for sm_90."""
    from hopper_compile import Job, compile_for_hopper

    mod = "moeserve.kernels.norm_rope"
    norm_types = dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", r_ptr="*bf16", sum_ptr="*bf16", eps="fp32")
    jobs = [Job(mod, "_rms_norm_kernel", norm_types, dict(D=d, BLOCK_R=br, BLOCK_D=bd, ADD=add), warps,
                label=f"rms_norm {d} add={add}")
            for d, br, bd, warps in ((2048, 2, 2048, 4), (128, 16, 128, 4), (576, 4, 1024, 4), (7168, 1, 8192, 8))
            for add in (False, True)]
    jobs += [Job(mod, "_rotary_kernel", dict(x_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", out_ptr="*bf16"),
                 dict(HALF=half, INTERLEAVED=inter, BLOCK_H=bh, BLOCK_HALF=half), 4, label=f"rotary {half} {inter}")
             for half, inter, bh in ((64, False, 32), (32, True, 16))]
    jobs += [Job(mod, "_rope_cache_kernel", dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", qw_ptr="*bf16",
                                                kw_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", q_out_ptr="*bf16",
                                                kc_ptr="*bf16", vc_ptr="*bf16", slot_ptr="*i64", eps="fp32"),
                 dict(NORM=norm, HALF=64, INTERLEAVED=inter, BLOCK_H=16, BLOCK_HALF=64), 4,
                 label=f"rope_and_cache norm={norm} interleaved={inter}")
             for norm, inter in ((True, False), (False, False), (False, True))]
    jobs += [Job(mod, "_mla_rope_cache_kernel", dict(q_ptr="*bf16", lat_ptr="*bf16", kpe_ptr="*bf16", w_ptr="*bf16",
                                                    cos_ptr="*fp32", sin_ptr="*fp32", q_out_ptr="*bf16",
                                                    cache_ptr="*bf16", slot_ptr="*i64", eps="fp32"),
                 dict(L=512, BLOCK_L=512, HALF=32, INTERLEAVED=inter, BLOCK_H=16, BLOCK_HALF=32), 4,
                 label=f"mla_rope_and_cache interleaved={inter}")
             for inter in (False, True)]
    for job in jobs:  # launched on Hopper with programmatic dependent launch
        job.constexprs["PDL"] = True
    assert compile_for_hopper(jobs) == {}


@pytest.mark.parametrize("shape", [(1, 64), (37, 48), (0, 32)])
def test_add_rms_norm(shape, gen):
    """The residual add fused into the norm: the sum exactly as torch adds, the norm as rms_norm's."""
    x, r = ((torch.randn(*shape, generator=gen, device=DEVICE) * 3).to(DTYPE) for _ in range(2))
    w = (torch.rand(shape[-1], generator=gen, device=DEVICE) + 0.5).to(DTYPE)
    normed, total = norm_rope.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, x + r)
    assert torch.equal(normed, norm_rope.rms_norm(x + r, w, 1e-6))
    want, want_total = ref.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, want_total)
    if x.numel():
        assert rel_err(normed, want) < TOL


@pytest.mark.parametrize("t,hq,lat,rope", [(1, 4, 32, 16), (13, 3, 48, 32), (5, 16, 512, 64)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mla_rope_and_cache(t, hq, lat, rope, interleaved, gen):
    """MLA's rope parts rotated, latent normed and cache row written in one launch, against the
    reference's separate steps: the same rotated q_pe, the same rows at the slots, every other slot
    untouched. Inputs are views of wider projections, as the model passes them."""
    q = (torch.randn(t, hq, 40 + rope, generator=gen, device=DEVICE) * 3).to(DTYPE)
    kv = (torch.randn(t, 8 + lat + rope, generator=gen, device=DEVICE) * 3).to(DTYPE)
    q_pe, latent, k_pe = q[..., 40:], kv[:, 8:8 + lat], kv[:, 8 + lat:]
    angles = torch.rand(t, rope // 2, generator=gen, device=DEVICE) * 100
    cos, sin = angles.cos(), angles.sin()
    w = (torch.rand(lat, generator=gen, device=DEVICE) + 0.5).to(DTYPE)
    blocks, block_size = 5, 4
    slots = torch.randperm(blocks * block_size, generator=torch.Generator().manual_seed(t))[:t].to(DEVICE)
    caches = [torch.full((blocks, block_size, lat + rope), 7.0, device=DEVICE).to(DTYPE) for _ in range(2)]
    got = norm_rope.mla_rope_and_cache(q_pe, latent, k_pe, w, 1e-6, cos, sin, interleaved, caches[0], slots)
    want = ref.mla_rope_and_cache(q_pe, latent, k_pe, w, 1e-6, cos, sin, interleaved, caches[1], slots)
    assert got.shape == want.shape == (t, hq, rope) and got.dtype == want.dtype and got.is_contiguous()
    assert rel_err(got, want) < TOL
    rows, want_rows = caches[0].view(-1, lat + rope), caches[1].view(-1, lat + rope)
    assert rel_err(rows[slots], want_rows[slots]) < TOL
    assert (row_errs(rows[slots], want_rows[slots]) < 3 * TOL).all()
    untouched = torch.ones(blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert (rows[untouched] == 7.0).all()
