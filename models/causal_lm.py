"""The trunk every architecture shares: embeddings, pre-norm decoder layers, final norm, LM head.

Parameter names equal the HF checkpoint tensor names (`model.layers.{i}.self_attn...`, `lm_head.weight`),
so loading is name to name. Routed experts are not parameters here: they sit behind the expert backend.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops
from .batch import AttentionBatch
from .config import ModelConfig
from .layers.moe import ExpertBackend, MoEBlock
from .layers.norm import PendingNorm, RMSNorm
from .layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm residual block; the feed-forward lives under the architecture's HF name (mlp, block_sparse_moe)."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, ffn: nn.Module, ffn_name: str = "mlp"):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_name = ffn_name
        self.add_module(ffn_name, ffn)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the feed-forward's output, the residual stream before it is added): each block's output
        is added to the stream by the next norm (the next layer's, or the final one), one kernel
        instead of an add and a norm. residual None: x is the embeddings, the stream's start. The
        attention gets its input norm pending (PendingNorm): its first projection may take the add and
        the norm in its own launch."""
        h = self.input_layernorm(x) if residual is None else PendingNorm(x, residual, self.input_layernorm)
        out = self.self_attn(h, rope, batch)
        residual = x if residual is None else h.total()
        ffn = getattr(self, self.ffn_name)
        if isinstance(ffn, MoEBlock):  # the router's logits may come from the norm's own launch
            norm = self.post_attention_layernorm
            h, residual, logits = ops.add_rms_norm_router_logits(out, residual, norm.weight, norm.eps, ffn.gate.weight)
            return ffn(h, logits), residual
        h, residual = self.post_attention_layernorm.add_forward(out, residual)
        return ffn(h), residual


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoECausalLM(nn.Module, abc.ABC):
    """Base of the architectures; subclasses provide `build_layer` and their HF expert tensor names."""

    # HF tensor names of one routed expert: `{prefix}.{e}.{gate|up|down}.weight` (per-expert layout,
    # as released and as transformers writes) or `{prefix}.gate_up_proj` / `.down_proj` (fused [E, ...]).
    expert_prefix = "model.layers.{layer}.mlp.experts"
    expert_proj_names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rotary = self.build_rotary(config)
        self.model = DecoderStack(config, [self.build_layer(config, i) for i in range(config.num_hidden_layers)])
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.experts_backend: ExpertBackend | None = None
        self.kv_block_size: int | None = None

    def build_rotary(self, config: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(config.head_dim, config.rope)

    @abc.abstractmethod
    def build_layer(self, config: ModelConfig, layer_id: int) -> DecoderLayer:
        """Decoder layer `layer_id` of this architecture (its attention and its dense MLP or MoE block)."""

    @classmethod
    def checkpoint_names(cls, name: str) -> list[str]:
        """Names a trunk tensor may have on disk, preferred first."""
        return [name]

    @property
    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: m for i, layer in enumerate(self.model.layers) if isinstance(m := getattr(layer, layer.ffn_name), MoEBlock)}

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        """Route every MoE layer's experts through `backend(layer_id, hidden, topk_ids, topk_weights)`."""
        self.experts_backend = backend
        for block in self.moe_blocks.values():
            block.experts_backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Final-normed hidden states [T, H] for the flat batch of token ids [T] at positions [T]."""
        if input_ids.shape != positions.shape or input_ids.shape[0] != batch.num_tokens:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, positions {tuple(positions.shape)} and "
                f"batch.slot_mapping ({batch.num_tokens}) must all be [T]"
            )
        x = self.model.embed_tokens(input_ids)
        rope = tuple(t.to(x.dtype) for t in self.rotary.cos_sin(positions))  # cast once, not in every layer
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, batch)
        return self.model.norm(x) if residual is None else self.model.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [N, H] -> float32 logits [N, V]."""
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of KV cache one token takes over all layers (MLA: the latent, not expanded K/V)."""
        dtype = dtype or self.model.embed_tokens.weight.dtype
        elems = sum(layer.self_attn.cache_elements_per_token() for layer in self.model.layers)
        return elems * torch.empty((), dtype=dtype).element_size()

    def takes_chunk_plans(self, device: torch.device) -> bool:
        """Whether every layer attends fixed-shape chunk steps after cached prefixes (AttentionBatch.chunk_plan):
        GQA layers through the prefill kernel (GQAttention.takes_chunk_plan), MLA layers as one padded call."""
        return all(getattr(layer.self_attn, "takes_chunk_plan", lambda _device: False)(device)
                   for layer in self.model.layers)

    def pads_chunk_contexts(self) -> bool:
        """Whether some layer reads a fixed-shape chunk step's contexts padded to the step's padded_len (MLA), so
        that the step's shape has a context width; GQA layers read the cache in place through the plan."""
        return any(hasattr(layer.self_attn, "padded_chunk_fits") for layer in self.model.layers)

    def chunk_context_fits(self, num_seqs: int, chunk: int, context: int) -> bool:
        """Whether a fixed-shape chunk step of num_seqs chunks of `chunk` rows over `context` padded keys each
        stays within the bounds of every layer that pads contexts."""
        return all(layer.self_attn.padded_chunk_fits(num_seqs, chunk, context) for layer in self.model.layers
                   if hasattr(layer.self_attn, "padded_chunk_fits"))

    def kv_caches(self) -> list[torch.Tensor]:
        """Every layer's allocated cache tensors ([num_blocks, block_size, ...] each)."""
        return [c for layer in self.model.layers for c in layer.self_attn.caches()]

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Allocate and bind each layer's paged cache [num_blocks, block_size, ...] (zeroed)."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        weight = self.model.embed_tokens.weight
        device = torch.device(device) if device is not None else weight.device
        dtype = dtype or weight.dtype
        for layer in self.model.layers:
            layer.self_attn.allocate_cache(num_blocks, block_size, device, dtype)
            warm_up = getattr(layer.self_attn, "warm_up_kernels", None)
            if warm_up is not None:
                warm_up()
        self.kv_block_size = block_size
        self.fuse_projections()

    def fuse_projections(self) -> None:
        """Projections that read the same input become one GEMM each (q/k/v; MLA's first query
        projection with kv_a; a dense MLP's gate and up): on CUDA, where each GEMM of a decode step
        costs a launch (layers/fused_linear.py). Their parameters become views of the fused weights,
        so names, state_dict and memory do not change. Called when the KV cache is allocated, once
        the weights are loaded and placed; a no-op on the CPU."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections"):
                module.fuse_projections()
