"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of the compressed latent.

The cache holds, per token, the normalised kv latent (kv_lora_rank) and the rotated shared key
(qk_rope_head_dim); keys and values are rebuilt through kv_b_proj when attending. Long contexts
with few queries (decode) instead absorb kv_b_proj into the query and output, so the per-step
cost does not grow with an expansion of every cached token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..batch import AttentionBatch
from ..config import ModelConfig
from .fused_linear import fuse, project
from .norm import PendingNorm, RMSNorm, materialize
from . import padded_attention as padded
from moeserve.kernels import ops

from .decode_attention import attend_decode, batched_fits, decode_lens, decode_mask, gather_padded, is_decode_only
from .paged_attention import (attend, attend_fresh, attention_mask, check_block_size, gather_cache, read_slots,
                              sequences)
from .rotary import RotaryEmbedding, softmax_mscale


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        mla = config.mla
        assert mla is not None
        h, bias = config.hidden_size, config.attention_bias
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = mla.q_lora_rank
        self.kv_lora_rank = mla.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=bias)
        self.scale = qk_dim**-0.5 * softmax_mscale(config.rope) ** 2
        self.rotary = rotary
        self.latent_cache: torch.Tensor | None = None
        self.in_proj = None  # the query's first projection and kv_a_proj_with_mqa as one GEMM (CUDA)

    @property
    def _q_first(self) -> nn.Linear:
        """The query's projection that reads the hidden state: q_proj, or q_a_proj with a q LoRA."""
        return self.q_proj if self.q_lora_rank is None else self.q_a_proj

    def fuse_projections(self) -> None:
        if self.in_proj is None:
            self.in_proj = fuse([self._q_first, self.kv_a_proj_with_mqa])

    def cache_elements_per_token(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def caches(self) -> tuple[torch.Tensor, ...]:
        return () if self.latent_cache is None else (self.latent_cache,)

    def allocate_cache(self, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.latent_cache = torch.zeros(num_blocks, block_size, self.cache_elements_per_token(), device=device, dtype=dtype)

    def warm_up_kernels(self) -> None:
        """Compile the decode attention kernel's eager form now (int32 lengths and tables, as an eager
        step's decode rows launch it; the graph captures compile the form they replay), not in the first
        step that needs it: one launch over block 0, nothing written. On CPU the reference runs instead."""
        cache = self.latent_cache.unsqueeze(2)
        q = torch.zeros(1, self.num_heads, cache.shape[-1], dtype=cache.dtype, device=cache.device)
        tables = torch.zeros(1, 1, dtype=torch.int32, device=cache.device)
        lens = torch.ones(1, dtype=torch.int32, device=cache.device)
        ops.paged_decode_attention(q, cache, cache[..., : self.kv_lora_rank], tables, lens, self.scale, 1)

    def forward(self, x: torch.Tensor | PendingNorm, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch
                ) -> torch.Tensor:
        if self.latent_cache is None:
            raise RuntimeError("no KV cache: call model.allocate_kv_cache(num_blocks, block_size) first")
        t = x.shape[0]
        if self.in_proj is not None:  # a PendingNorm's add and norm may run in the projection's launch
            q, kv_a = self.in_proj(x)
        else:
            x = materialize(x)
            q, kv_a = self._q_first(x), self.kv_a_proj_with_mqa(x)
        if self.q_lora_rank is not None:
            q = project(self.q_b_proj, self.q_a_layernorm(q))
        q = q.reshape(t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        check_block_size(self.latent_cache, batch)
        # the rope parts rotated, the latent normed and its cache row written: one kernel on a GPU
        q_pe = ops.mla_rope_and_cache(q_pe, latent, k_pe, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, *rope,
                                      self.rotary.interleaved, self.latent_cache, batch.slot_mapping)

        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        split = padded.split_mixed(batch, x.device)
        if split is None:
            return project(self.o_proj, self._attend(q_nope, q_pe, w_kv, batch).reshape(t, -1))
        out = torch.empty(t, self.num_heads, self.v_dim, dtype=x.dtype, device=x.device)
        for part in split:  # the decodes, then the prefill chunks, each attended its own way
            out[part.rows] = self._attend(q_nope.index_select(0, part.rows), q_pe.index_select(0, part.rows), w_kv,
                                          part.batch)
        return project(self.o_proj, out.reshape(t, -1))

    def _attend(self, q_nope, q_pe, w_kv, batch: AttentionBatch) -> torch.Tensor:
        """Queries of `batch` over the cached latents (already written) -> [T, H, v_dim]."""
        t, device, dtype = q_nope.shape[0], q_nope.device, q_nope.dtype
        if batch.fresh:  # whole prompts in a fixed-shape step: each causal over its own latents, expanded
            k, v = self._expand(read_slots(self.latent_cache, batch.slot_mapping).to(dtype))
            return attend_fresh(torch.cat([q_nope, q_pe], dim=-1), k, v, self.scale, batch.query_lens[0], None)
        if batch.chunk_plan is not None:  # chunks after cached prefixes in a fixed-shape step: padded_len latents each
            return self._attend_padded(q_nope, q_pe, w_kv, batch)
        if is_decode_only(batch):
            lens, longest = decode_lens(batch, device)
            if self.kv_lora_rank + self.rope_dim < longest * (self.nope_dim + self.v_dim):
                return self._decode_absorbed(q_nope, q_pe, w_kv, lens, longest, batch.block_tables)
            if batched_fits(batch, self.latent_cache):  # contexts of a token or two: expanding is cheaper
                cached = gather_padded(self.latent_cache, batch).to(dtype)
                return self._decode_expanded(q_nope, q_pe, cached, decode_mask(batch, device, None))
        if padded.fits(batch, self.num_heads, self._key_bytes(q_nope.element_size())):  # prefill steps: one padded call
            return self._attend_padded(q_nope, q_pe, w_kv, batch)
        out = torch.empty(t, self.num_heads, self.v_dim, dtype=dtype, device=device)
        for seq, rows, q_len, ctx_len in sequences(batch):
            cached = gather_cache(self.latent_cache, batch, seq, ctx_len).to(dtype)
            mask = attention_mask(q_len, ctx_len, None, device)
            if q_len * (self.kv_lora_rank + self.rope_dim) < ctx_len * (self.nope_dim + self.v_dim):
                out[rows] = self._attend_absorbed(q_nope[rows], q_pe[rows], cached, w_kv, mask)
            else:
                out[rows] = self._attend_expanded(q_nope[rows], q_pe[rows], cached, mask)
        return out

    def _key_bytes(self, element_size: int) -> int:
        """Bytes per padded key of a padded call: the latent, and the expanded keys and values when the sizes
        favour expanding."""
        return (self.kv_lora_rank + self.rope_dim + self.num_heads * (self.nope_dim + self.rope_dim + self.v_dim)
                ) * element_size

    def takes_chunk_plan(self, device: torch.device) -> bool:
        """Fixed-shape chunk steps after cached prefixes (AttentionBatch.chunk_plan) attend as one padded call
        (torch operations a CUDA graph can replay): every sequence's latents read padded to the step's
        padded_len, masked by the lengths in the plan (padded_attention's planned layout)."""
        return True

    def padded_chunk_fits(self, num_seqs: int, chunk: int, context: int) -> bool:
        """Whether a fixed-shape chunk step of num_seqs chunks of `chunk` rows over `context` padded keys each
        stays within the padded call's bounds (padded_attention.fits)."""
        size = self.latent_cache.element_size() if self.latent_cache is not None else 2
        return padded.fits_shape(num_seqs, chunk, context, self.num_heads, self._key_bytes(size))

    def _decode_absorbed(self, q_nope, q_pe, w_kv, lens, longest, block_tables) -> torch.Tensor:
        """One query per sequence attending the cached latents in place (paged decode attention with
        one shared head: keys are latent + rope, values the latent), kv_b_proj absorbed around it."""
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)
        cache = self.latent_cache.unsqueeze(2)  # [blocks, block_size, 1, latent + rope]
        # Not `settled`, though it could be: with MLA's 576-wide rows at the default launch, reading the
        # first tile before the wait made the batch-1 step slower on an H200 (docs/benchmarks.md).
        out = ops.paged_decode_attention(torch.cat([q_latent, q_pe], dim=-1), cache, cache[..., : self.kv_lora_rank],
                                         block_tables, lens, self.scale, longest)
        return torch.einsum("bhr,hvr->bhv", out, w_uv)

    def _decode_expanded(self, q_nope, q_pe, cached, mask) -> torch.Tensor:
        """One query per sequence over cached [B, L, latent + rope] with keys and values expanded."""
        b, n = cached.shape[:2]
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(b, n, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, n, self.num_heads, self.rope_dim)], dim=-1)
        return attend_decode(torch.cat([q_nope, q_pe], dim=-1), k.transpose(1, 2), v.transpose(1, 2), self.scale, mask)

    def _attend_padded(self, q_nope, q_pe, w_kv, batch: AttentionBatch) -> torch.Tensor:
        """Every sequence at once over the padded latents; expanded or absorbed as the sizes favour."""
        cached = gather_padded(self.latent_cache, batch).to(q_nope.dtype)  # [B, Lk, latent + rope]
        b, n = cached.shape[:2]
        lay = padded.layout(batch, q_nope.device)
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if q_nope.shape[0] * (self.kv_lora_rank + self.rope_dim) < b * n * (self.nope_dim + self.v_dim):
            w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)
            q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
            mask = padded.mask(batch, q_nope.device, None, self.num_heads, q_nope.dtype)  # one latent KV head
            out = padded.attend_padded(torch.cat([q_latent, q_pe], dim=-1), cached.unsqueeze(2), latent.unsqueeze(2),
                                       self.scale, lay, mask)
            return torch.einsum("thr,hvr->thv", out, w_uv)
        mask = padded.mask(batch, q_nope.device, None, dtype=q_nope.dtype)
        kv = self.kv_b_proj(latent).view(b, n, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, n, self.num_heads, self.rope_dim)], dim=-1)
        return padded.attend_padded(torch.cat([q_nope, q_pe], dim=-1), k, v, self.scale, lay, mask)

    def _expand(self, cached) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [n, H, nope + rope] and values [n, H, v_dim] of cached latents [n, latent + rope]."""
        n = cached.shape[0]
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(n, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        return torch.cat([k_nope, k_pe[:, None, :].expand(n, self.num_heads, self.rope_dim)], dim=-1), v

    def _attend_expanded(self, q_nope, q_pe, cached, mask) -> torch.Tensor:
        k, v = self._expand(cached)
        return attend(torch.cat([q_nope, q_pe], dim=-1), k, v, self.scale, mask)

    def _attend_absorbed(self, q_nope, q_pe, cached, w_kv, mask) -> torch.Tensor:
        # q_nope . (W_uk c) == (W_uk^T q_nope) . c, and W_uv is applied after the softmax.
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("qhn,hnr->qhr", q_nope, w_uk)
        k = cached.unsqueeze(1)  # one shared "head": [n, 1, kv_lora_rank + rope_dim]
        v = cached[:, : self.kv_lora_rank].unsqueeze(1)
        out_latent = attend(torch.cat([q_latent, q_pe], dim=-1), k, v, self.scale, mask)
        return torch.einsum("qhr,hvr->qhv", out_latent, w_uv)
