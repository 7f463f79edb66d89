"""Loading HF checkpoints: parts read only their tensors, sharded and fused layouts, refusals that name the tensor."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from checkpoints import build_checkpoint, edit_config, read_tensors, rewrite_tensors
from moeserve.models.batch import AttentionBatch
from moeserve.models.errors import CheckpointError, ModelConfigError
from moeserve.models.local_experts import LocalExperts
from moeserve.models.loader import load_expert_weights, load_model

IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]
ROUTED = re.compile(r"\.(mlp|block_sparse_moe)\.experts\.")


def _logits(model, ids=IDS):
    model.allocate_kv_cache(num_blocks=4, block_size=4)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionBatch.contiguous(0, len(ids), 4))
    return model.compute_logits(hidden)


def _hf_logits(hf, ids=IDS):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def _copy(src, dst, keep):
    shutil.copytree(src, dst)
    rewrite_tensors(dst, {k: v for k, v in read_tensors(src).items() if keep(k)})
    return dst


def test_trunk_reads_no_routed_expert(hf_checkpoint, tmp_path):
    full = hf_checkpoint("deepseek_v3")
    trunk_only = _copy(full, tmp_path / "trunk", keep=lambda k: not ROUTED.search(k))
    model = load_model(trunk_only, load_experts=False)
    with pytest.raises(RuntimeError, match="expert backend"):
        _logits(model)
    model.set_expert_backend(LocalExperts(load_expert_weights(full, list(range(8)))))
    torch.testing.assert_close(_logits(model), _logits(load_model(full)), atol=0, rtol=0)


def test_expert_group_reads_only_its_experts(tmp_path):
    path, hf = build_checkpoint(tmp_path / "full", "qwen3_moe")
    mine = re.compile(r"\.experts\.(2|5)\.")
    part = _copy(path, tmp_path / "part", keep=lambda k: not ROUTED.search(k) or mine.search(k))
    weights = load_expert_weights(part, [5, 2])
    assert sorted(weights) == [0, 2]  # layer 1 is in mlp_only_layers
    w13, w2 = weights[2]
    hf_experts = hf.model.layers[2].mlp.experts
    torch.testing.assert_close(w13, hf_experts.gate_up_proj.detach()[[5, 2]], atol=0, rtol=0)
    torch.testing.assert_close(w2, hf_experts.down_proj.detach()[[5, 2]], atol=0, rtol=0)
    with pytest.raises(CheckpointError, match=re.escape("model.layers.0.mlp.experts.0.gate_proj.weight")):
        load_expert_weights(part, [0])
    with pytest.raises(ValueError, match="expert_ids"):
        load_expert_weights(part, [2, 8])


def test_experts_split_over_two_groups_sum_to_the_whole(hf_checkpoint):
    path = hf_checkpoint("deepseek_v3")
    groups = [LocalExperts(load_expert_weights(path, ids), expert_ids=ids, num_experts=8) for ids in ([0, 1, 2, 3], [7, 6, 5, 4])]
    model = load_model(path, load_experts=False)
    model.set_expert_backend(lambda layer, h, ids, w: groups[0](layer, h, ids, w) + groups[1](layer, h, ids, w))
    torch.testing.assert_close(_logits(model), _logits(load_model(path)), atol=1e-5, rtol=0)


def test_sharded_checkpoint(tmp_path):
    path, hf = build_checkpoint(tmp_path, "deepseek_v3", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3 and not (path / "model.safetensors").exists()
    torch.testing.assert_close(_logits(load_model(path)), _hf_logits(hf), atol=1e-4, rtol=0)
    lost = sorted(files)[-1]
    (path / lost).unlink()
    with pytest.raises(CheckpointError, match=f"{lost}.* is missing") as err:
        load_model(path)
    assert index["weight_map"][err.value.tensor] == lost


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_expert_layout_loads(arch, tmp_path):
    """Experts stored as transformers' in-memory [E, ...] gate_up_proj/down_proj (and Mixtral's `mlp.` names)."""
    path, hf = build_checkpoint(tmp_path, arch, seed=3)
    rewrite_tensors(path, hf.state_dict())  # in memory, transformers >= 5 names Mixtral's MoE `mlp`
    assert any(k.endswith("experts.gate_up_proj") for k in read_tensors(path))
    torch.testing.assert_close(_logits(load_model(path)), _hf_logits(hf), atol=1e-4, rtol=0)


def test_tied_embeddings(tmp_path):
    path, hf = build_checkpoint(tmp_path, "qwen3_moe", tie_word_embeddings=True)
    assert "lm_head.weight" not in read_tensors(path)
    torch.testing.assert_close(_logits(load_model(path)), _hf_logits(hf), atol=1e-4, rtol=0)


def test_bfloat16_load_keeps_router_in_float32(hf_checkpoint):
    model = load_model(hf_checkpoint("deepseek_v3"), dtype=torch.bfloat16)
    layer = model.model.layers[1]
    assert layer.self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert layer.mlp.gate.weight.dtype == torch.float32
    assert layer.mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.experts_backend.weights[1][0].dtype == torch.bfloat16
    logits = _logits(model)
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize(
    "tensor",
    ["model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.mlp.experts.3.down_proj.weight",
     "model.layers.1.mlp.gate.e_score_correction_bias", "lm_head.weight"],
)
def test_missing_tensor_is_named(tensor, hf_checkpoint, tmp_path):
    broken = _copy(hf_checkpoint("deepseek_v3"), tmp_path / "broken", keep=lambda k: k != tensor)
    with pytest.raises(CheckpointError, match=re.escape(tensor)) as err:
        load_model(broken)
    assert err.value.tensor == tensor and "missing" in str(err.value)


@pytest.mark.parametrize("tensor", ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.experts.0.gate_proj.weight"])
def test_wrong_shape_is_named(tensor, hf_checkpoint, tmp_path):
    src = hf_checkpoint("deepseek_v3")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tensors = read_tensors(src)
    tensors[tensor] = tensors[tensor][:-1]
    rewrite_tensors(broken, tensors)
    with pytest.raises(CheckpointError, match=re.escape(tensor) + ".*shape") as err:
        load_model(broken)
    assert err.value.tensor == tensor


def test_unsupported_architecture_is_named(hf_checkpoint, tmp_path):
    broken = tmp_path / "llama"
    shutil.copytree(hf_checkpoint("mixtral"), broken)
    edit_config(broken, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ModelConfigError, match="model_type.*'llama'"):
        load_model(broken)


def test_no_safetensors_is_refused(tmp_path, hf_checkpoint):
    shutil.copy(hf_checkpoint("mixtral") / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)
