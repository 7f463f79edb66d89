"""Expert groups as Ray actors: the actor itself, and greedy outputs over 2 and 4 groups on the `ray`
transport (2 on `gloo`) equal to the single-process run, token for token, for all three architectures."""

from __future__ import annotations

import pytest
import ray
import torch
from group_cases import ARCHS, RESOURCES, generate

from moeserve.cluster.controller import ControllerConfig, start_controller
from moeserve.cluster.placement import Placement, ServingSet, contiguous_groups
from moeserve.experts.backend import ray_expert_backend
from moeserve.experts.batch import ExpertBatch
from moeserve.experts.group import ExpertGroupActor
from moeserve.experts.weights import CheckpointWeights
from moeserve.kernels import ops
from moeserve.models.config import ModelConfig
from moeserve.models.loader import load_expert_weights
from moeserve.router.dispatch import ExpertDispatcher, StaticSource
from moeserve.router.transport.base import ReplicaFailure
from moeserve.router.transport.ray import RayTransport



def test_group_actor_runs_reports_and_drains(ray_cluster, hf_checkpoint):
    path = str(hf_checkpoint("qwen3_moe"))
    actor = ExpertGroupActor.options(num_cpus=0.1).remote(1, (4, 5, 6, 7), CheckpointWeights(path), RESOURCES)
    try:
        info = ray.get(actor.ready.remote())
        assert info["experts"] == [4, 5, 6, 7] and info["device"] == "cpu" and info["layers"] == [0, 2]
        placement = Placement(8, contiguous_groups(8, 2)[1:], ((1, ("g1",)),), epoch=1)
        d = ExpertDispatcher(StaticSource(ServingSet(placement, {"g1": actor}, {"g1": 0})), RayTransport(), [0, 2])
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(6, 64, generator=g)
        ids = torch.randint(4, 8, (6, 2), generator=g)
        weights = torch.rand(6, 2, generator=g)
        w13, w2 = load_expert_weights(path, list(range(8)))[2]
        assert torch.equal(d(2, hidden, ids, weights), ops.fused_experts(hidden, w13, w2, ids, weights))
        stats = ray.get(actor.stats.remote())
        assert sum(stats["per_layer"][2].values()) == 12 and set(stats["per_layer"][2]) <= {4, 5, 6, 7}
        assert ray.get(actor.health.remote())["in_flight"] == 0
        assert ray.get(actor.drain.remote(5.0)) is True
        transport = RayTransport()
        pending = transport.send("g1", actor, ExpertBatch(2, hidden, ids - 4, weights), torch.device("cpu"))
        assert transport.wait([pending], 60.0) == [pending]
        with pytest.raises(ReplicaFailure) as failure:
            pending.result()
        assert failure.value.kind == "draining" and failure.value.replica_id == "g1"
    finally:
        ray.kill(actor)


@pytest.mark.parametrize("transport,group_counts", [("ray", (2, 4)), ("gloo", (2,))])
@pytest.mark.parametrize("arch", ARCHS)
def test_ray_groups_equal_single_process(ray_cluster, hf_checkpoint, arch, transport, group_counts):
    path = str(hf_checkpoint(arch))
    want = generate(path)
    n_exp = ModelConfig.from_dir(path).moe.n_routed_experts
    for groups in group_counts:
        cfg = ControllerConfig(weights=CheckpointWeights(path), num_experts=n_exp, num_groups=groups,
                               resources=RESOURCES, name=f"{arch}-{groups}-{transport}", namespace="test-ray-groups")
        controller = start_controller(cfg)
        try:
            got = generate(path, ray_expert_backend(controller, transport=transport))
            status = ray.get(controller.status.remote())
        finally:
            ray.get(controller.shutdown.remote())
            ray.kill(controller)
        assert got == want, f"{arch} over {groups} groups ({transport})"
        assert len(status["groups"]) == groups and sum(status["expert_load"].values()) > 0
