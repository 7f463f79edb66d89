"""A DeepSeek-V3 FP8 block-scaled checkpoint loads like its dequantised twin (and like HF on the twin)."""

from __future__ import annotations

import pytest
import torch

from checkpoints import build_checkpoint, edit_config, read_tensors, rewrite_tensors
from moeserve.kernels.reference import block_dequant
from moeserve.models.batch import AttentionBatch
from moeserve.models.errors import CheckpointError
from moeserve.models.fp8 import is_quantised_in_release, quantize_block_fp8
from moeserve.models.loader import Fp8ExpertWeights, load_expert_weights, load_model

BLOCK = (128, 128)
# hidden 64 and intermediate 160 are not multiples of 128 (padded scale blocks); experts' 128 is.
DIMS = dict(intermediate_size=160, moe_intermediate_size=128)


@pytest.fixture(scope="module")
def fp8_and_twin(tmp_path_factory):
    fp8_dir = tmp_path_factory.mktemp("fp8")
    twin_dir = tmp_path_factory.mktemp("twin")
    _, hf = build_checkpoint(twin_dir, "deepseek_v3", seed=0, **DIMS)
    tensors = read_tensors(twin_dir)
    quantised, twin = {}, {}
    for name, t in tensors.items():
        if is_quantised_in_release(name):
            q, s = quantize_block_fp8(t, BLOCK)
            quantised[name], quantised[name + "_scale_inv"] = q, s
            twin[name] = block_dequant(q, s, BLOCK)
        else:
            quantised[name] = twin[name] = t
    rewrite_tensors(twin_dir, twin)
    build_checkpoint(fp8_dir, "deepseek_v3", seed=0, **DIMS)
    rewrite_tensors(fp8_dir, quantised)
    edit_config(fp8_dir, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": list(BLOCK)})
    return fp8_dir, twin_dir, quantised


def _logits(model, ids):
    model.allocate_kv_cache(num_blocks=4, block_size=8)
    return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), AttentionBatch.contiguous(0, len(ids), 8)))


def test_fp8_checkpoint_matches_dequantised_twin_and_hf(fp8_and_twin):
    import transformers

    fp8_dir, twin_dir, quantised = fp8_and_twin
    assert any(t.dtype == torch.float8_e4m3fn for t in quantised.values())
    ids = list(range(3, 40, 3))
    got = _logits(load_model(fp8_dir), ids)
    twin = _logits(load_model(twin_dir), ids)
    torch.testing.assert_close(got, twin, atol=1e-5, rtol=0)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(twin_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(got, hf(torch.tensor([ids])).logits[0], atol=1e-4, rtol=0)


def test_keep_fp8_returns_stored_experts_and_scales(fp8_and_twin):
    fp8_dir, twin_dir, quantised = fp8_and_twin
    raw = load_expert_weights(fp8_dir, [6, 1], keep_fp8=True)
    deq = load_expert_weights(twin_dir, [6, 1])
    assert sorted(raw) == sorted(deq) == [1, 2]
    layer = raw[2]
    assert isinstance(layer, Fp8ExpertWeights) and layer.block_size == BLOCK
    assert layer.w13.dtype == torch.float8_e4m3fn and layer.w13.shape == (2, 256, 64)
    assert layer.w13_scale_inv.shape == (2, 2, 1) and layer.w2_scale_inv.shape == (2, 1, 1)
    stored = quantised["model.layers.2.mlp.experts.6.up_proj.weight"]
    assert torch.equal(layer.w13[0, 128:].view(torch.uint8), stored.view(torch.uint8))
    w13, w2 = deq[2]
    torch.testing.assert_close(block_dequant(layer.w13, layer.w13_scale_inv, BLOCK), w13, atol=0, rtol=0)
    torch.testing.assert_close(block_dequant(layer.w2, layer.w2_scale_inv, BLOCK), w2, atol=0, rtol=0)


def test_keep_fp8_on_unquantised_checkpoint_is_refused(fp8_and_twin):
    with pytest.raises(CheckpointError, match="quantization_config"):
        load_expert_weights(fp8_and_twin[1], [0], keep_fp8=True)


def test_missing_scale_is_named(fp8_and_twin, tmp_path):
    import shutil

    fp8_dir, _, quantised = fp8_and_twin
    broken = tmp_path / "broken"
    shutil.copytree(fp8_dir, broken)
    name = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    rewrite_tensors(broken, {k: v for k, v in quantised.items() if k != name})
    with pytest.raises(CheckpointError, match=name):
        load_model(broken)


def test_quantize_round_trip_error_is_within_e4m3_precision():
    w = torch.randn(200, 130, generator=torch.Generator().manual_seed(0))
    q, s = quantize_block_fp8(w, BLOCK)
    assert q.shape == w.shape and s.shape == (2, 2)
    back = block_dequant(q, s, BLOCK)
    scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :130]
    # e4m3 has 3 mantissa bits: half an ulp is 2**-4 relative; subnormals step by 2**-9 of the scale.
    assert bool(((back - w).abs() <= 2**-4 * w.abs() + 2**-10 * scale).all())
    assert not torch.equal(back, w)
