"""Shared by the expert-group tests: the architectures, the groups' resources and a greedy run over an
expert backend."""

from __future__ import annotations

import torch

from moeserve.experts.group import GroupResources
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams

ARCHS = ("deepseek_v3", "qwen3_moe", "mixtral")
# One BLAS thread in the trunk and in every group: bitwise-equal results need equal thread counts, and
# on a 2-core machine several 2-thread OpenMP pools only spin against each other.
RESOURCES = GroupResources(num_cpus=0.1, torch_threads=1)


def prompts(vocab: int) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (1, 4, 9, 17, 30)]


def generate(path: str, backend=None) -> list[list[int]]:
    cfg = EngineConfig(model=path, num_kv_blocks=64, block_size=8, load_experts=backend is None,
                       expert_backend=backend)
    engine = LLMEngine.from_config(cfg)
    try:
        outs = engine.generate_batch(prompts(engine.model_config.vocab_size), SamplingParams(max_tokens=10))
    finally:
        backend_obj = engine.model.experts_backend
        if hasattr(backend_obj, "close"):
            backend_obj.close()
    return [o.new_token_ids for o in outs]
