"""Grouped-query attention over the paged KV cache (Mixtral, Qwen3-MoE with q/k RMSNorm)."""

from __future__ import annotations

import torch
from torch import nn

from ..batch import AttentionBatch
from ..config import ModelConfig
from .fused_linear import fuse, project
from .norm import PendingNorm, RMSNorm, materialize
from . import padded_attention as padded
from moeserve.kernels import ops

from .decode_attention import decode_lens, gather_padded, is_decode_only
from .paged_attention import (attend, attend_fresh, attention_mask, check_block_size, gather_cache, read_slots,
                              sequences)
from .rotary import RotaryEmbedding


class GQAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotary = rotary
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.qkv = None  # q, k and v as one GEMM once fuse_projections ran (CUDA)

    def takes_chunk_plan(self, device: torch.device) -> bool:
        """Whether this layer attends a fixed-shape chunk step (AttentionBatch.chunk_plan) on `device`: on a
        GPU through the prefill attention kernel, which reads the plan in place (a CUDA graph can replay it);
        on the CPU through the eager path (no capture there)."""
        return device.type != "cuda" or ops.prefill_attention_in_place(device, self.head_dim, self.head_dim,
                                                                         self.num_heads, self.num_kv_heads)

    def fuse_projections(self) -> None:
        if self.qkv is None:
            self.qkv = fuse([self.q_proj, self.k_proj, self.v_proj])

    def cache_elements_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def caches(self) -> tuple[torch.Tensor, ...]:
        return () if self.k_cache is None else (self.k_cache, self.v_cache)

    def allocate_cache(self, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)

    def warm_up_kernels(self) -> None:
        """Compile now, not in the first step that needs them (Triton compiles on first use), the
        prefill attention kernel and the decode attention kernel's eager form (int32 lengths and
        tables, as an eager step's decode rows launch it; the graph captures compile the form they
        replay): one launch each over block 0, nothing written. On CPU the references run instead."""
        device = self.k_cache.device
        q = torch.zeros(1, self.num_heads, self.head_dim, dtype=self.k_cache.dtype, device=device)
        tables = torch.zeros(1, 1, dtype=torch.int32, device=device)
        lens = torch.ones(1, dtype=torch.int32, device=device)
        ops.paged_decode_attention(q, self.k_cache, self.v_cache, tables, lens, self.scale, 1, self.sliding_window,
                                   settled=True)
        if ops.prefill_attention_in_place(device, self.head_dim, self.head_dim, self.num_heads, self.num_kv_heads):
            ops.paged_prefill_attention(q, self.k_cache, self.v_cache, tables, [1], [1], self.scale,
                                        self.sliding_window)

    def forward(self, x: torch.Tensor | PendingNorm, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch
                ) -> torch.Tensor:
        if self.k_cache is None:
            raise RuntimeError("no KV cache: call model.allocate_kv_cache(num_blocks, block_size) first")
        t = x.shape[0]
        if self.qkv is not None:  # a PendingNorm's add and norm may run in the projection's launch
            q, k, v = self.qkv(x)
        else:
            x = materialize(x)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        check_block_size(self.k_cache, batch)
        # q/k norms, rotary embedding and the cache writes: one kernel on a GPU
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
        q = ops.rope_and_cache(q, k, v, *rope, self.rotary.interleaved, self.k_cache, self.v_cache,
                               batch.slot_mapping, *norms)
        split = padded.split_mixed(batch, x.device)
        if split is None:
            return project(self.o_proj, self._attend(q, batch).reshape(t, -1))
        out = torch.empty(t, self.num_heads, self.head_dim, dtype=q.dtype, device=x.device)
        for part in split:  # the decodes, then the prefill chunks, each attended its own way
            out[part.rows] = self._attend(q.index_select(0, part.rows), part.batch)
        return project(self.o_proj, out.reshape(t, -1))

    def _attend(self, q: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Queries q [T, Hq, D] of `batch` over the cache (their KV already written) -> [T, Hq, D]."""
        t, device = q.shape[0], q.device
        if batch.fresh:  # whole prompts in a fixed-shape step: each causal over its own keys
            keys = read_slots(self.k_cache, batch.slot_mapping).to(q.dtype)
            values = read_slots(self.v_cache, batch.slot_mapping).to(q.dtype)
            return attend_fresh(q, keys, values, self.scale, batch.query_lens[0], self.sliding_window)
        if batch.chunk_plan is not None:  # chunks after cached prefixes in a fixed-shape step
            if ops.prefill_attention_in_place(device, self.head_dim, self.head_dim, self.num_heads, self.num_kv_heads):
                return ops.paged_prefill_attention(q, self.k_cache, self.v_cache, batch.block_tables, batch.query_lens,
                                                   batch.context_lens, self.scale, self.sliding_window,
                                                   plan=batch.chunk_plan)
            part = padded.unplan(batch)  # without capture (CPU): the real chunks, attended as an eager step's
            out = q.new_zeros(t, self.num_heads, self.head_dim)
            if part.rows.numel():  # none in a padding-only step (a capture ahead of use)
                out[part.rows] = self._attend(q.index_select(0, part.rows), part.batch)
            return out
        if is_decode_only(batch):  # one call for the batch, reading the paged cache in place
            lens, longest = decode_lens(batch, device)
            # settled: this step's rope_and_cache, the launch before, wrote only each sequence's last row
            return ops.paged_decode_attention(q, self.k_cache, self.v_cache, batch.block_tables, lens, self.scale,
                                              longest, self.sliding_window, settled=True)
        if ops.prefill_attention_in_place(device, self.head_dim, self.head_dim, self.num_heads, self.num_kv_heads):
            # prefill chunks on a GPU: one kernel reading the paged cache in place, any cached prefix
            return ops.paged_prefill_attention(q, self.k_cache, self.v_cache, batch.block_tables, batch.query_lens,
                                               batch.context_lens, self.scale, self.sliding_window)
        key_bytes = 2 * self.num_kv_heads * self.head_dim * q.element_size()
        if padded.fits(batch, self.num_heads, key_bytes):  # prefill steps: one padded call
            keys = gather_padded(self.k_cache, batch).to(q.dtype)
            values = gather_padded(self.v_cache, batch).to(q.dtype)
            return padded.attend_padded(q, keys, values, self.scale, padded.layout(batch, device),
                                        padded.mask(batch, device, self.sliding_window,
                                                    self.num_heads // self.num_kv_heads, q.dtype))
        out = torch.empty(t, self.num_heads, self.head_dim, dtype=q.dtype, device=device)
        for seq, rows, q_len, ctx_len in sequences(batch):
            keys = gather_cache(self.k_cache, batch, seq, ctx_len).to(q.dtype)
            values = gather_cache(self.v_cache, batch, seq, ctx_len).to(q.dtype)
            mask = attention_mask(q_len, ctx_len, self.sliding_window, device)
            out[rows] = attend(q[rows], keys, values, self.scale, mask)
        return out
