"""Trunk workers that ask for a custom resource (`serve --trunk-resource`): one the cluster cannot place waits,
counted as starting (Ray's autoscaler sees it as demand for a node offering the resource, as it does a
pending expert-group replica: tests/cluster/test_fake_multinode.py), the pool serves on meanwhile, and
scaling back down gives the waiting worker up."""

from __future__ import annotations

import asyncio

import pytest

RESOURCE = "moeserve_trunk"


@pytest.fixture
def ray_with_one_trunk_slot(tmp_path_factory):
    """A Ray of this test's own whose one node offers a single unit of RESOURCE."""
    import ray
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, resources={RESOURCE: 1}, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             include_dashboard=False, namespace="test-trunk-demand")
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.mark.asyncio
async def test_a_trunk_worker_without_a_slot_waits_and_is_given_up(ray_with_one_trunk_slot, demo_model_dir):
    import ray

    from moeserve.router.config import EngineConfig
    from moeserve.router.sequence import SamplingParams
    from moeserve.router.trunk_pool import TrunkPool

    config = EngineConfig(model=str(demo_model_dir), max_num_seqs=4, num_kv_blocks=64)
    # Two workers asked for at start: the pool serves once one has started, the other waits for a slot.
    pool = TrunkPool(config, replicas=2, max_replicas=2, torch_threads=1, actor_options={"resources": {RESOURCE: 1}})
    await asyncio.wait_for(pool.start(), 120)
    try:
        assert ray.available_resources().get(RESOURCE, 0) == 0  # the first worker holds the only unit
        assert pool.scale(2) == "trunk workers: already 2"  # the waiting one counts towards the target
        waiting = pool.members("starting")
        assert len(waiting) == 1
        # It cannot be placed: still starting a while later, and the one serving worker answers meanwhile.
        out = [o async for o in pool.generate("r0", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))]
        await asyncio.sleep(2.0)
        assert sum(len(o.new_token_ids) for o in out) == 8 and out[-1].finish_reason == "length"
        assert pool.replicas == 1 and pool.pending == 1
        assert pool.stats()["trunk_workers_starting"] == 1
        said = pool.scale(1)
        assert said.startswith("trunk workers: draining 1 (to 1)"), said
        for _ in range(100):
            if not pool.members("draining"):
                break
            await asyncio.sleep(0.05)
        assert pool.replicas == 1 and pool.pending == 0 and len(pool.members()) == 1, pool.events
        assert any(e == f"trunk worker #{waiting[0].index} stopped before it served" for e in pool.events), pool.events
        assert ray.available_resources().get(RESOURCE, 0) == 0  # the serving worker still holds its unit
    finally:
        await pool.shutdown(0)


def test_trunk_flags_are_checked():
    from moeserve.cluster.cli import build_parser
    from moeserve.cluster.cli.serve import edge_control_plane, trunk_workers

    parse = build_parser().parse_args
    assert trunk_workers(parse(["serve"])) == 0
    assert trunk_workers(parse(["serve", "--trunk-worker"])) == 1
    assert trunk_workers(parse(["serve", "--trunk-workers", "3", "--trunk-resource", RESOURCE])) == 3
    for argv, message in (
        (["--trunk-workers", "-1"], "--trunk-workers: must be >= 0, got -1"),
        (["--trunk-resource", RESOURCE], "--trunk-resource: needs --trunk-workers"),
        (["--trunk-workers", "2", "--trunk-resource", "GPU"], "--trunk-resource: 'GPU' is one of Ray's own"),
        (["--trunk-workers", "2", "--trunk-resource", "trunk_{group}"], "--trunk-resource: 'trunk_{group}' is not"),
        (["--trunk-workers", "2", "--trunk-resource", "two words"], "--trunk-resource: 'two words' is not"),
        (["--trunk-workers", "2", "--trunk-stall-timeout", "0"], "--trunk-stall-timeout: must be > 0 seconds, got 0.0"),
        (["--trunk-routing", "least-busy"], "--trunk-routing: needs --trunk-workers"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
            trunk_workers(parse(["serve", *argv]))
    with pytest.raises(ValueError, match="--expert-groups: must be >= 0, got -1"):
        edge_control_plane(parse(["serve", "--trunk-workers", "2", "--expert-groups", "-1"]))
    # No control plane in the edge without Ray expert groups (the workers hold local ones, or none).
    assert edge_control_plane(parse(["serve", "--trunk-workers", "2"])) is None
    assert edge_control_plane(parse(["serve", "--trunk-workers", "2", "--expert-groups", "2", "--transport", "local"])) is None
