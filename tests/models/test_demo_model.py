"""The demo checkpoint: deterministic from a seed, a valid HF DeepSeek-V3 checkpoint, fast to load and run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from moeserve.cluster.cli import main as cli_main
from moeserve.models.batch import AttentionBatch
from moeserve.models.config import ModelConfig
from moeserve.models.demo import _tensor_specs, ensure_demo_model, preset_config, write_demo_model
from moeserve.models.demo_presets import PRESETS
from moeserve.models.generate import greedy_generate
from moeserve.models.loader import load_expert_weights, load_model
from moeserve.models.tokenizer import load_tokenizer


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(demo_model_dir, tmp_path):
    again = write_demo_model(tmp_path / "again", seed=0)
    assert _files(again) == _files(demo_model_dir)
    other = _files(write_demo_model(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != _files(demo_model_dir)["model.safetensors"]
    assert other["tokenizer.json"] == _files(demo_model_dir)["tokenizer.json"]


def test_demo_is_the_documented_deepseek_v3_shape(demo_model_dir):
    c = ModelConfig.from_dir(demo_model_dir)
    tok = load_tokenizer(demo_model_dir)
    assert c.model_type == "deepseek_v3" and c.num_hidden_layers == 4 and c.moe.moe_layer_ids == [1, 2, 3]
    assert (c.moe.n_routed_experts, c.moe.num_experts_per_tok, c.moe.n_group, c.moe.topk_group) == (16, 4, 4, 2)
    assert c.moe.n_shared_experts == 1 and c.mla.q_lora_rank == 32 and c.hidden_size == 64
    assert c.vocab_size == tok.vocab_size == 512 and c.max_position_embeddings == 2048
    assert c.eos_token_ids == tok.eos_token_ids == [tok.token_id("<|end_of_text|>")]


def test_demo_loads_in_transformers_with_equal_logits(demo_model_dir):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(demo_model_dir, attn_implementation="eager").float().eval()
    model = load_model(demo_model_dir)
    ids = load_tokenizer(demo_model_dir).encode("The river was grey with mist.")
    model.allocate_kv_cache(num_blocks=4, block_size=16)
    got = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), AttentionBatch.contiguous(0, len(ids), 16)))
    with torch.no_grad():
        torch.testing.assert_close(got, hf(torch.tensor([ids])).logits[0], atol=1e-4, rtol=0)


def test_demo_generates_and_tokenizer_round_trips(demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    text = "Ask me anything: 42 apples, ünïcode & émoji 🙂."
    assert tok.decode(tok.encode(text)) == text
    out = greedy_generate(load_model(demo_model_dir), tok.encode("The morning train"), 8, block_size=16)
    assert len(out) == 8 and all(0 <= t < tok.vocab_size for t in out)
    assert isinstance(tok.decode(out), str)


def test_sharded_preset_with_override_matches_transformers(tmp_path):
    import transformers

    small = {"num_hidden_layers": 2, "hidden_size": 64, "head_dim": 16, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_experts": 8, "moe_intermediate_size": 32, "intermediate_size": 64,
             "vocab_size": 600}
    path = write_demo_model(tmp_path / "q", seed=2, preset="qwen3-30b-a3b", config_override=small,
                            dtype="float32", max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    model = load_model(path)
    ids = [3, 500, 77, 12, 599, 250]
    model.allocate_kv_cache(num_blocks=2, block_size=4)
    got = model.compute_logits(model(torch.tensor(ids), torch.arange(6), AttentionBatch.contiguous(0, 6, 4)))
    with torch.no_grad():
        torch.testing.assert_close(got, hf(torch.tensor([ids])).logits[0], atol=1e-4, rtol=0)


def test_fp8_preset_writes_block_scaled_experts(tmp_path):
    small = {"num_hidden_layers": 2, "first_k_dense_replace": 1, "hidden_size": 64, "intermediate_size": 160,
             "moe_intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 8,
             "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "q_lora_rank": 32, "kv_lora_rank": 32,
             "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "vocab_size": 512}
    path = write_demo_model(tmp_path / "v3", preset="deepseek-v3", config_override=small, dtype="fp8")
    assert ModelConfig.from_dir(path).quant.weight_block_size == (128, 128)
    raw = load_expert_weights(path, [0, 7], keep_fp8=True)[1]
    assert raw.w13.dtype == torch.float8_e4m3fn and raw.w13_scale_inv.shape == (2, 2, 1)
    model = load_model(path, dtype=torch.bfloat16)
    model.allocate_kv_cache(num_blocks=1, block_size=8)
    logits = model.compute_logits(model(torch.tensor([1, 2, 3]), torch.arange(3), AttentionBatch.contiguous(0, 3, 8)))
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize(
    "preset, billions", [("deepseek-v3", 671), ("deepseek-v2-lite", 15.7), ("qwen3-30b-a3b", 30.5), ("mixtral-8x7b", 46.7)]
)
def test_real_size_presets_have_the_released_parameter_counts(preset, billions):
    specs = _tensor_specs(ModelConfig.from_hf(preset_config(preset)))
    total = sum(torch.Size(shape).numel() for _, shape in specs)
    assert abs(total / 1e9 - billions) / billions < 0.01, total


def test_ensure_demo_model_writes_once(tmp_path):
    target = tmp_path / "cache" / "demo-x"
    assert ensure_demo_model(target) == target
    inode = os.stat(target / "model.safetensors").st_ino
    assert ensure_demo_model(target) == target
    assert os.stat(target / "model.safetensors").st_ino == inode
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo-x"]  # no temp dir left behind
    assert load_tokenizer(target).vocab_size == 512


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    assert cli_main(["demo-model", str(out), "--seed", "1", "--config-override", '{"num_hidden_layers": 3}']) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert cli_main(["demo-model", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["demo-model", str(tmp_path / "n"), "--config-override", "[1]"])
    assert set(PRESETS) >= {"demo", "deepseek-v2-lite", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3"}


def test_a_node_without_the_edges_demo_checkpoint_uses_its_own(tmp_path, monkeypatch, demo_model_dir):
    """A trunk worker or expert group on another node gets the edge's demo path; this node's demo stands in."""
    from moeserve.experts.weights import CheckpointWeights
    from moeserve.models.demo import default_cache_dir, local_model_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "this-node"))
    edges = str(tmp_path / "edge-node" / "moeserve" / default_cache_dir().name)  # not on this node
    here = local_model_path(edges)
    assert here == str(default_cache_dir()) and Path(here, "config.json").is_file()
    # Seeded: the same tensors on every node (the session's demo was written with the same seed).
    assert Path(here, "model.safetensors").read_bytes() == Path(demo_model_dir, "model.safetensors").read_bytes()
    weights = CheckpointWeights(edges).load([0, 1], "cpu")
    assert weights and all(w13.shape[0] == 2 for w13, _ in weights.values())
    # Any other path is left alone (a missing real checkpoint fails where it is opened, naming it).
    assert local_model_path(str(tmp_path / "no-such-model")) == str(tmp_path / "no-such-model")
    assert local_model_path(str(demo_model_dir)) == str(demo_model_dir)
