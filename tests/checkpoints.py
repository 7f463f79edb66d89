"""Tiny HF checkpoints of each supported architecture, built with transformers (the test oracle).

Plain functions so any test folder can build one: `build_checkpoint(tmp_path, "deepseek_v3")`
writes config.json + safetensors exactly as `save_pretrained` does. Never downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Small enough for a 2-core machine, big enough to exercise groups, dense layers and GQA.
TINY: dict[str, dict] = {
    "deepseek_v3": dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=256,
    ),
    "deepseek_v2": dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
        max_position_embeddings=256,
    ),
    "qwen3_moe": dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=256,
    ),
    "mixtral": dict(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    ),
}
_CLASSES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}


def hf_config(arch: str, **overrides):
    """A transformers config of the tiny `arch` model; no eos/bos so generation never stops early."""
    import transformers

    kwargs = {**TINY[arch], "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
              "initializer_range": 0.1, **overrides}
    return getattr(transformers, _CLASSES[arch][0])(**kwargs)


def build_hf_model(arch: str, seed: int = 0, **overrides):
    """A float32 transformers model with random weights, norms and gate biases (eval mode, eager attention)."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(arch, **overrides)
    config._attn_implementation = "eager"
    model = getattr(transformers, _CLASSES[arch][1])(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF initialises these to constants, which would hide a wrongly wired norm or bias.
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return model


def build_checkpoint(path: str | Path, arch: str, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Write a tiny random `arch` checkpoint to `path` with save_pretrained; returns (path, hf_model)."""
    path = Path(path)
    model = build_hf_model(arch, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path, model


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded checkpoint directory."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def rewrite_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a checkpoint's weights by `tensors` in one model.safetensors (drops any shard index)."""
    path = Path(path)
    for f in list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})


def edit_config(path: str | Path, **changes) -> None:
    """Update fields of config.json in place (None removes a field)."""
    file = Path(path) / "config.json"
    cfg = json.loads(file.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    file.write_text(json.dumps(cfg, indent=2))
