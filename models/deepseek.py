"""DeepSeek-V3 (R1) and V2/V2-Lite: MLA attention, first_k_dense_replace dense layers, shared experts,
and the gate of each version (V3 sigmoid + correction bias + groups; V2 softmax greedy or by group).
"""

from __future__ import annotations

from .causal_lm import DecoderLayer, MoECausalLM
from .config import ModelConfig
from .layers.mla import MLAttention
from .layers.mlp import MLP
from .layers.moe import MoEBlock
from .layers.rotary import RotaryEmbedding


class DeepseekForCausalLM(MoECausalLM):
    def build_rotary(self, config: ModelConfig) -> RotaryEmbedding:
        assert config.mla is not None
        return RotaryEmbedding(config.mla.qk_rope_head_dim, config.rope)

    def build_layer(self, config: ModelConfig, layer_id: int) -> DecoderLayer:
        if layer_id in config.moe_layers:
            ffn = MoEBlock(config, layer_id)
        else:
            ffn = MLP(config.hidden_size, config.intermediate_size)
        return DecoderLayer(config, MLAttention(config, self.rotary), ffn)
