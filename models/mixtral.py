"""Mixtral: GQA attention and a softmax top-2 MoE in every layer (HF module `block_sparse_moe`)."""

from __future__ import annotations

from .causal_lm import DecoderLayer, MoECausalLM
from .config import ModelConfig
from .layers.attention import GQAttention
from .layers.moe import MoEBlock


class MixtralForCausalLM(MoECausalLM):
    expert_prefix = "model.layers.{layer}.block_sparse_moe.experts"
    expert_proj_names = ("w1", "w3", "w2")

    def build_layer(self, config: ModelConfig, layer_id: int) -> DecoderLayer:
        return DecoderLayer(config, GQAttention(config, self.rotary), MoEBlock(config, layer_id), "block_sparse_moe")

    @classmethod
    def checkpoint_names(cls, name: str) -> list[str]:
        # transformers >= 5 names the module `mlp` in memory; accept checkpoints written that way.
        return [name, name.replace(".block_sparse_moe.", ".mlp.")] if ".block_sparse_moe." in name else [name]
