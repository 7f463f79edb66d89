"""The engine with its experts in N in-process groups (`--expert-groups N --transport local`), and the
Ray resource each Ray group asks for (`--expert-resource`)."""

from __future__ import annotations

import pytest

from moeserve.experts.backend import embedded_expert_backend
from moeserve.experts.group import GroupResources
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
    assert plain.expert_backend is None and plain.load_experts and plain.prefix_caching
    assert not engine_config(parse(["serve", "--model", path, "--no-prefix-caching"])).prefix_caching
    grouped = engine_config(parse(["serve", "--model", path, "--expert-groups", "2", "--transport", "local",
                                   "--num-kv-blocks", "32", "--block-size", "8"]))
    assert grouped.expert_backend is not None and not grouped.load_experts
    engine = LLMEngine.from_config(grouped)
    assert len(engine.model.experts_backend.serving.placement.groups) == 2
    with pytest.raises(ValueError, match="--expert-groups: must be >= 0"):
        engine_config(parse(["serve", "--model", path, "--expert-groups", "-1"]))


def test_expert_resource_must_name_a_resource(hf_checkpoint):
    from moeserve.cluster.cli import build_parser
    from moeserve.cluster.cli.serve import engine_config

    path = str(hf_checkpoint("mixtral"))
    parse = build_parser().parse_args
    for bad in ("moeserve expert {group}", "moeserve_expert_{gruop}", "{0}", "", "GPU"):
        with pytest.raises(ValueError, match="--expert-resource: "):
            engine_config(parse(["serve", "--model", path, "--expert-groups", "2", "--expert-resource", bad]))
    with pytest.raises(ValueError, match="--expert-resource: needs --transport ray or gloo"):
        engine_config(parse(["serve", "--model", path, "--expert-groups", "2", "--transport", "local",
                             "--expert-resource", "moeserve_expert_{group}"]))
    with pytest.raises(ValueError, match="custom_resource: 'x_{gruop}' is not a resource name"):
        GroupResources(custom_resource="x_{gruop}")
    for good, want in (("moeserve_expert_{group}", "moeserve_expert_3"), ("moeserve_expert", "moeserve_expert"),
                       ("pool-{group}.gpu", "pool-3.gpu")):
        assert GroupResources(num_gpus=0, custom_resource=good).actor_options(3)["resources"] == {want: 1}


@pytest.fixture
def ray_with_group_resources(tmp_path_factory, monkeypatch):
    """A private Ray instance offering one unit of moeserve_expert_0 and moeserve_expert_1; shut down after."""
    import ray
    import torch

    monkeypatch.setenv("MOESERVE_ADMIN_PORT", "off")  # no admin server on a fixed port from this test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, resources={"moeserve_expert_0": 1, "moeserve_expert_1": 1},
             _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False, namespace="test-expert-resource")
    yield ray
    ray.shutdown()
    torch.set_num_threads(threads)


def test_serve_expert_resource_reaches_each_groups_actor(hf_checkpoint, ray_with_group_resources):
    from moeserve.cluster.cli import build_parser
    from moeserve.cluster.cli.serve import engine_config

    ray = ray_with_group_resources
    path = str(hf_checkpoint("mixtral"))
    # --transport gloo: the same Ray groups, reached over standing gloo channels.
    args = build_parser().parse_args(["serve", "--model", path, "--expert-groups", "2", "--transport", "gloo",
                                      "--expert-resource", "moeserve_expert_{group}",
                                      "--num-kv-blocks", "32", "--block-size", "8"])
    engine = LLMEngine.from_config(engine_config(args))
    controller = ray.get_actor("moeserve-controller", namespace="moeserve")
    dispatcher = engine.model.experts_backend
    try:
        status = ray.get(controller.status.remote())
        held = {name: ray.cluster_resources()[name] - ray.available_resources().get(name, 0)
                for name in ("moeserve_expert_0", "moeserve_expert_1")}
        out = engine.generate_batch([[3, 1, 4, 1, 5]], SamplingParams(max_tokens=4))
        channels = dispatcher.transport.channels
    finally:
        dispatcher.close()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
    assert [len(g["replicas"]) for g in status["groups"]] == [1, 1]
    assert held == {"moeserve_expert_0": 1, "moeserve_expert_1": 1}  # each group's replica holds its own unit
    assert len(out[0].new_token_ids) == 4
    assert dispatcher.transport.name == "gloo" and channels == {"g0r0": None, "g1r0": None}, channels


def test_busy_time_leaves_out_the_wait_for_expert_groups(hf_checkpoint):
    """LLMEngine's busy_us, behind the autoscaler's trunk busy share, is step time less the dispatcher's
    waits for the expert groups' answers (expert_wait_s): with every send held back 20 ms by the chaos
    suite's slow transport, the waits hold at least most of that delay per MoE layer call, and the busy
    time is at most the run's wall time less them."""
    import time

    from moeserve.chaos.slow_transport import SlowTransport

    path = str(hf_checkpoint("mixtral"))
    make = embedded_expert_backend(path, transport="local", num_groups=2)

    def slowed(model):
        dispatcher = make(model)
        dispatcher.transport = SlowTransport(dispatcher.transport)
        dispatcher.transport.delay_s = 0.02
        return dispatcher

    engine = LLMEngine.from_config(EngineConfig(model=path, num_kv_blocks=32, block_size=8, load_experts=False,
                                                expert_backend=slowed))
    start = time.monotonic()
    engine.generate_batch([[3, 1, 4, 1, 5], [9, 2, 6]], SamplingParams(max_tokens=4))
    elapsed = time.monotonic() - start
    waited = engine.model.experts_backend.expert_wait_s
    calls = engine.stats()["steps"] * len(engine.model_config.moe.moe_layer_ids)
    busy = engine.stats()["busy_us"] / 1e6
    assert waited >= 0.5 * 0.02 * calls
    assert 0 < busy <= elapsed - waited
