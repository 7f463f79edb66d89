"""Projections of one input fused into one GEMM (models/layers/fused_linear.py): the same outputs,
the same parameters (views of the fused weight: names, state_dict and memory unchanged). The
models fuse only on CUDA; here the fusion is forced on the CPU to check it on every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeserve.models.batch import AttentionBatch
from moeserve.models.layers import attention, fused_linear, mla, mlp
from moeserve.models.layers.fused_linear import FusedLinears
from moeserve.models.layers.norm import PendingNorm, RMSNorm, materialize
from moeserve.models.loader import load_model


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linears_give_each_projection_and_share_its_memory(bias):
    g = torch.Generator().manual_seed(0)
    linears = [nn.Linear(24, n, bias=bias) for n in (32, 8, 8)]
    for lin in linears:
        nn.init.normal_(lin.weight, generator=g)
        if bias:
            nn.init.normal_(lin.bias, generator=g)
    x = torch.randn(5, 24, generator=g)
    want = [lin(x) for lin in linears]
    before = [{k: v.clone() for k, v in lin.state_dict().items()} for lin in linears]
    fused = FusedLinears(linears)
    for got, w in zip(fused(x), want):
        torch.testing.assert_close(got, w)
    for lin, sd in zip(linears, before):
        assert lin.state_dict().keys() == sd.keys()
        assert all(torch.equal(lin.state_dict()[k], v) for k, v in sd.items())
        assert lin.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    with torch.no_grad():  # a later load into a projection's parameter lands in the fused weight
        linears[1].weight.fill_(0.5)
    torch.testing.assert_close(fused(x)[1], linears[1](x))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linears_take_a_pending_norm(bias):
    """A decoder's input norm handed over pending (PendingNorm): the fused projections give what they
    give the normed tensor, the norm's tensor and the residual sum are the norm's own, whichever is
    asked first."""
    g = torch.Generator().manual_seed(1)
    linears = [nn.Linear(24, n, bias=bias) for n in (16, 8)]
    for lin in linears:
        nn.init.normal_(lin.weight, generator=g)
    norm = RMSNorm(24, 1e-6)
    nn.init.normal_(norm.weight, generator=g)
    x, residual = torch.randn(1, 24, generator=g), torch.randn(1, 24, generator=g)
    h, total = norm.add_forward(x, residual)
    fused = FusedLinears(linears)
    pending = PendingNorm(x, residual, norm)
    for got, w in zip(fused(pending), fused(h)):
        assert torch.equal(got, w)
    assert torch.equal(pending.total(), total)
    assert torch.equal(materialize(pending), h) and torch.equal(materialize(h), h)
    first = PendingNorm(x, residual, norm)  # the tensor first, then the projection
    assert torch.equal(first.tensor(), h) and torch.equal(fused(first)[0], fused(h)[0])
    assert torch.equal(first.total(), total) and first.shape == x.shape


def test_fused_under_inference_mode_keeps_ordinary_parameters():
    """greedy_generate allocates the KV cache (and so fuses) under inference_mode."""
    linears = [nn.Linear(8, 4), nn.Linear(8, 2)]
    with torch.inference_mode():
        FusedLinears(linears)
    assert not any(p.is_inference() for lin in linears for p in lin.parameters())


def test_fused_linears_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="input width"):
        FusedLinears([nn.Linear(8, 4), nn.Linear(6, 4)])
    with pytest.raises(ValueError, match="biases"):
        FusedLinears([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
    assert fused_linear.fuse([nn.Linear(8, 4)]) is None  # CPU weights: the models keep separate GEMMs


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "qwen3_moe", "mixtral"])
def test_models_give_the_same_logits_with_fused_projections(arch, hf_checkpoint, monkeypatch):
    model = load_model(hf_checkpoint(arch))
    tokens = torch.tensor([3, 17, 42, 9, 100, 7])

    def logits():
        model.allocate_kv_cache(num_blocks=4, block_size=4)
        batch = AttentionBatch.contiguous(0, len(tokens), 4)
        return model.compute_logits(model(tokens, torch.arange(len(tokens)), batch))

    names = {k: v.clone() for k, v in model.state_dict().items()}
    want = logits()
    for module in (attention, mla, mlp):
        monkeypatch.setattr(module, "fuse", FusedLinears)
    got = logits()
    fused = [m for m in model.modules() if any(isinstance(getattr(m, a, None), FusedLinears)
                                                for a in ("qkv", "in_proj", "gate_up"))]
    assert fused, "nothing was fused"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    state = model.state_dict()
    assert state.keys() == names.keys() and all(torch.equal(state[k], v) for k, v in names.items())
