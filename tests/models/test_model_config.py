"""ModelConfig: every architecture's spelling normalised; bad configs refused naming the field."""

from __future__ import annotations

import json

import pytest

from moeserve.models.config import ModelConfig
from moeserve.models.errors import ModelConfigError

# The shape of the released DeepSeek-V3 config.json (rope_scaling, not rope_parameters), shrunk.
RELEASED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 16,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "qk_nope_head_dim": 16, "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2,
    "num_experts_per_tok": 4, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_released_deepseek_v3_config():
    c = ModelConfig.from_hf(RELEASED_V3)
    assert c.moe.moe_layer_ids == [3, 4]
    assert (c.moe.n_routed_experts, c.moe.num_experts_per_tok, c.moe.n_group, c.moe.topk_group) == (16, 4, 4, 2)
    assert c.moe.shared_intermediate_size == 32 and c.moe.scoring_func == "sigmoid"
    assert c.num_key_value_heads == 4 and c.head_dim == 24  # MLA: one latent per token, qk = nope + rope
    assert c.mla.q_lora_rank == 48 and c.mla.kv_lora_rank == 32
    assert c.rope.type == "yarn" and c.rope.factor == 40 and c.rope.original_max_position_embeddings == 4096
    assert c.rope.interleaved
    assert c.quant.weight_block_size == (128, 128)
    assert c.eos_token_ids == [1] and c.bos_token_id == 0 and c.dtype == "bfloat16"


def test_hf_written_configs_of_each_architecture(hf_checkpoint):
    qwen = ModelConfig.from_dir(hf_checkpoint("qwen3_moe"))
    assert qwen.moe.moe_layer_ids == [0, 2] and qwen.qk_norm and qwen.num_key_value_heads == 2
    assert qwen.moe.n_routed_experts == 8 and qwen.moe.norm_topk_prob and qwen.head_dim == 16
    mixtral = ModelConfig.from_dir(hf_checkpoint("mixtral"))
    assert mixtral.moe.moe_layer_ids == [0, 1] and mixtral.moe.norm_topk_prob
    assert mixtral.moe.moe_intermediate_size == 48 and mixtral.rope.theta == 1e6
    v2 = ModelConfig.from_dir(hf_checkpoint("deepseek_v2"))
    assert v2.mla.q_lora_rank is None and v2.moe.scoring_func == "softmax" and v2.moe.topk_method == "greedy"


def test_qwen_sparse_step_and_dense_layers():
    base = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16, "max_position_embeddings": 128,
            "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert ModelConfig.from_hf(base).moe.moe_layer_ids == [1, 5]


def test_generation_config_eos_ids_win(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_V3))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == [1, 7]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"model_type": None}, "model_type"),
        ({"kv_lora_rank": None}, "kv_lora_rank"),
        ({"hidden_size": "wide"}, "hidden_size"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling.type"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"first_k_dense_replace": 5}, "num_hidden_layers"),
    ],
)
def test_bad_config_names_the_field(change, field):
    bad = {k: v for k, v in {**RELEASED_V3, **change}.items() if v is not None}
    with pytest.raises(ModelConfigError) as err:
        ModelConfig.from_hf(bad)
    assert err.value.field == field and repr(field) in str(err.value)


def test_gqa_heads_must_divide():
    d = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3, "num_local_experts": 4,
         "max_position_embeddings": 128}
    with pytest.raises(ModelConfigError, match="num_key_value_heads"):
        ModelConfig.from_hf(d)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ModelConfigError, match="config.json"):
        ModelConfig.from_dir(tmp_path)
