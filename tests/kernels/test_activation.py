"""SiLU(gate) * up (kernels/activation.py) against kernels/reference.py."""

import pytest
import torch
from kernel_cases import DEVICE, ON_GPU, rel_err, row_errs

from moeserve.kernels import activation
from moeserve.kernels import reference as ref

DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter's bf16 arithmetic is not trusted
TOL = 1e-2 if ON_GPU else 1e-5


@pytest.mark.parametrize("t,i", [(1, 64), (37, 1408), (5, 3000), (0, 16)])
def test_silu_mul_of_a_gate_up_projection(t, i, gen):
    """gate and up as the fused projection gives them: two halves (views) of one [T, 2I] tensor."""
    gate_up = (torch.randn(t, 2 * i, generator=gen, device=DEVICE) * 3).to(DTYPE)
    gate, up = gate_up.split([i, i], dim=-1)
    got, want = activation.silu_mul(gate, up), ref.silu_mul(gate, up)
    assert got.shape == want.shape and got.dtype == want.dtype
    if t:
        assert rel_err(got, want) < TOL
        assert (row_errs(got, want) < 3 * TOL).all()


def test_silu_mul_refuses_mismatched_halves(gen):
    with pytest.raises(ValueError, match="silu_mul"):
        activation.silu_mul(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 9, device=DEVICE))


def test_compiles_for_hopper():
    from hopper_compile import Job, compile_for_hopper

    jobs = [Job("moeserve.kernels.activation", "_silu_mul_kernel", dict(g_ptr=f"*{t}", u_ptr=f"*{t}", out_ptr=f"*{t}"),
                dict(BLOCK=1024, PDL=True), 4, label=f"silu_mul {t}") for t in ("bf16", "fp16")]
    assert compile_for_hopper(jobs) == {}
