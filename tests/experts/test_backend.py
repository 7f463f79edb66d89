"""The engine with its experts in N in-process groups (`--expert-groups N --transport local`)."""

from __future__ import annotations

import pytest

from moeserve.experts.backend import embedded_expert_backend
from moeserve.router.engine import EngineConfig, LLMEngine, SamplingParams


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral"])
def test_local_groups_equal_single_process(hf_checkpoint, arch):
    path = str(hf_checkpoint(arch))
    prompts, params = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]], SamplingParams(max_tokens=8)
    want = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=32, block_size=8)).generate_batch(prompts, params)
    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=32, block_size=8, load_experts=False,
                                                expert_backend=embedded_expert_backend(path, transport="local", num_groups=3)))
    got = engine.generate_batch(prompts, params)
    assert [o.new_token_ids for o in got] == [o.new_token_ids for o in want]
    assert len(engine.model.experts_backend.serving.placement.groups) == 3


def test_embedded_backend_arguments_are_checked():
    with pytest.raises(ValueError, match="transport"):
        embedded_expert_backend("x", transport="nccl")
    with pytest.raises(ValueError, match="expert_groups: must be >= 1"):
        embedded_expert_backend("x", transport="local", num_groups=0)


def test_serve_flags_build_the_expert_backend(hf_checkpoint):
    from moeserve.cluster.cli import build_parser
    from moeserve.cluster.cli.serve import engine_config

    path = str(hf_checkpoint("mixtral"))
    parse = build_parser().parse_args
    plain = engine_config(parse(["serve", "--model", path]))
    assert plain.expert_backend is None and plain.load_experts
    grouped = engine_config(parse(["serve", "--model", path, "--expert-groups", "2", "--transport", "local",
                                   "--num-kv-blocks", "32", "--block-size", "8"]))
    assert grouped.expert_backend is not None and not grouped.load_experts
    engine = LLMEngine.from_config(grouped)
    assert len(engine.model.experts_backend.serving.placement.groups) == 2
    with pytest.raises(ValueError, match="--expert-groups: must be >= 0"):
        engine_config(parse(["serve", "--model", path, "--expert-groups", "-1"]))
