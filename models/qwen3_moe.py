"""Qwen3-MoE: GQA attention with per-head q/k RMSNorm; softmax top-k MoE except mlp_only_layers."""

from __future__ import annotations

from .causal_lm import DecoderLayer, MoECausalLM
from .config import ModelConfig
from .layers.attention import GQAttention
from .layers.mlp import MLP
from .layers.moe import MoEBlock


class Qwen3MoeForCausalLM(MoECausalLM):
    def build_layer(self, config: ModelConfig, layer_id: int) -> DecoderLayer:
        if layer_id in config.moe_layers:
            ffn = MoEBlock(config, layer_id)
        else:
            ffn = MLP(config.hidden_size, config.intermediate_size)
        return DecoderLayer(config, GQAttention(config, self.rotary), ffn)
