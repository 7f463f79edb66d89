"""Quantisers and checkpoint loading into the kernels' expert layout."""

import pytest
import torch

from moeserve.kernels import reference as ref
from moeserve.kernels.weights import (
    ExpertWeights,
    load_experts,
    quantize_experts,
    quantize_fp8_block,
    quantize_int8_channel,
)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("n,k", [(256, 384), (200, 130)])  # the second leaves partial blocks
def test_fp8_block_roundtrip(n, k, cpu_gen):
    w = torch.randn(3, n, k, generator=cpu_gen)
    q, s = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, -(-n // 128), -(-k // 128))
    assert _rel(ref.block_dequant(q, s), w) < 0.04  # e4m3: 3 mantissa bits


def test_int8_channel_roundtrip(cpu_gen):
    w = torch.randn(2, 64, 96, generator=cpu_gen)
    q, s = quantize_int8_channel(w)
    assert q.dtype == torch.int8 and s.shape == (2, 64)
    assert _rel(ref.dequant_int8_channel(q, s), w) < 0.01


def _checkpoint(gen, quant, names=("gate_proj", "up_proj", "down_proj"), e=4, h=256, i=160):
    """Per-expert tensors as DeepSeek-V3 (FP8) / compressed-tensors W8A16 (INT8) / bf16 ship them."""
    tensors, full = {}, []
    for x in range(e):
        mats = {names[0]: torch.randn(i, h, generator=gen), names[1]: torch.randn(i, h, generator=gen),
                names[2]: torch.randn(h, i, generator=gen)}
        full.append(mats)
        for name, m in mats.items():
            key = f"model.layers.3.mlp.experts.{x}.{name}"
            if quant == "fp8":
                tensors[f"{key}.weight"], tensors[f"{key}.weight_scale_inv"] = quantize_fp8_block(m)
            elif quant == "int8":
                q, s = quantize_int8_channel(m)
                tensors[f"{key}.weight"], tensors[f"{key}.weight_scale"] = q, s[:, None]
            else:
                tensors[f"{key}.weight"] = m.bfloat16()
    return tensors, full


@pytest.mark.parametrize("quant", ["bf16", "fp8", "int8"])
def test_load_experts_from_checkpoint_tensors(quant, cpu_gen):
    tensors, full = _checkpoint(cpu_gen, quant)
    ew = load_experts(tensors, "model.layers.3.mlp.experts", [2, 0])  # a group holding experts 2 and 0
    assert ew.quant == quant and ew.num_experts == 2 and ew.hidden_size == 256 and ew.intermediate_size == 160
    for local, orig in enumerate([2, 0]):
        want13 = torch.cat([full[orig]["gate_proj"], full[orig]["up_proj"]])
        want2 = full[orig]["down_proj"]
        if quant == "fp8":
            got13 = ref.dequant_w13_fp8(ew.w13[local:local + 1], ew.w13_scale[local:local + 1])[0]
            got2 = ref.block_dequant(ew.w2[local], ew.w2_scale[local])
        elif quant == "int8":
            got13 = ref.dequant_int8_channel(ew.w13[local], ew.w13_scale[local])
            got2 = ref.dequant_int8_channel(ew.w2[local], ew.w2_scale[local])
        else:
            got13, got2 = ew.w13[local].float(), ew.w2[local].float()
        assert _rel(got13, want13) < 0.04 and _rel(got2, want2) < 0.04


def test_load_mixtral_names(cpu_gen):
    tensors, _ = _checkpoint(cpu_gen, "bf16", names=("w1", "w3", "w2"))
    assert load_experts(tensors, "model.layers.3.mlp.experts", [0, 1, 2, 3]).w13.shape == (4, 320, 256)


def test_quantize_experts_matches_per_tensor_quantisers(cpu_gen):
    w13 = torch.randn(2, 192, 128, generator=cpu_gen).bfloat16()
    w2 = torch.randn(2, 128, 96, generator=cpu_gen).bfloat16()
    fp8 = quantize_experts(ExpertWeights(w13, w2), "fp8")
    gq, gs = quantize_fp8_block(w13[:, :96])
    assert torch.equal(fp8.w13[:, :96].view(torch.uint8), gq.view(torch.uint8)) and torch.equal(fp8.w13_scale[:, :1], gs)
    assert fp8.w13_scale.shape == (2, 2, 1)  # gate's block row, then up's


def test_expert_weights_validates_shapes():
    w13, w2 = torch.zeros(2, 8, 4), torch.zeros(2, 4, 4)
    ExpertWeights(w13, w2)
    with pytest.raises(ValueError, match="w2 must be"):
        ExpertWeights(w13, torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="w13_scale must be"):
        ExpertWeights(w13.to(torch.int8), w2.to(torch.int8), torch.ones(2, 7), torch.ones(2, 4), "int8")
    with pytest.raises(ValueError, match="quant must be"):
        ExpertWeights(w13, w2, quant="fp4")
