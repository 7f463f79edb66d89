"""Kernel tests run the Triton kernels on CUDA when present, else on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when a kernel
is defined), so it is set here, before the test modules import them.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moeserve.kernels import launch  # noqa: E402


@pytest.fixture(autouse=True)
def poison_buffers():
    """Every buffer a kernel wrapper allocates starts as NaN / garbage, so unwritten rows fail."""
    previous = launch.set_poison(True)
    yield
    launch.set_poison(previous)


@pytest.fixture
def gen():
    """A generator with a fresh random seed per test (printed, so a failure can be replayed with
    KERNEL_TEST_SEED=<seed>)."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed}")
    g = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu")
    g.manual_seed(seed)
    return g


@pytest.fixture
def cpu_gen(gen):
    """Like gen, on the CPU, for tests that build checkpoints in host memory."""
    g = torch.Generator(device="cpu")
    g.manual_seed(gen.initial_seed())
    return g
