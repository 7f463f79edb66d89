"""One expert group without Ray: loads only its experts, computes what the full model computes, drains."""

from __future__ import annotations

import pytest
import torch

from moeserve.experts.batch import ExpertBatch
from moeserve.experts.errors import GroupDrainingError, StaleRoutingError
from moeserve.experts.weights import CheckpointWeights, RandomWeights, parse_dtype
from moeserve.experts.worker import ExpertGroupWorker
from moeserve.kernels import ops
from moeserve.models.loader import load_expert_weights


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    return str(hf_checkpoint("qwen3_moe"))


def test_worker_holds_only_its_experts(ckpt):
    w = ExpertGroupWorker(1, (5, 2), CheckpointWeights(ckpt))
    full = load_expert_weights(ckpt, list(range(8)))
    assert w.layers == sorted(full) and w.experts == (5, 2)
    for layer, (w13, w2) in w._weights.items():
        assert torch.equal(w13, full[layer][0][[5, 2]]) and torch.equal(w2, full[layer][1][[5, 2]])


def test_run_equals_the_full_expert_set_on_held_experts(ckpt):
    w = ExpertGroupWorker(0, (3, 6, 1), CheckpointWeights(ckpt))
    layer = w.layers[0]
    full13, full2 = load_expert_weights(ckpt, list(range(8)))[layer]
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(9, full13.shape[2], generator=g)
    local = torch.randint(0, 3, (9, 2), generator=g)
    local[4, 1] = -1  # a slot held elsewhere contributes nothing
    weights = torch.rand(9, 2, generator=g)
    logical = torch.where(local >= 0, torch.tensor([3, 6, 1])[local.clamp(min=0)], local)
    want = ops.fused_experts(rows, full13, full2, logical, weights)
    got = w.run(ExpertBatch(layer, rows, local, weights))
    assert torch.equal(got, want)
    stats = w.stats()
    counts = stats["per_layer"][layer]
    assert sum(counts.values()) == 17 and set(counts) <= {3, 6, 1} and stats["rows"] == 17


def test_stale_routing_and_unknown_layer_are_refused(ckpt):
    w = ExpertGroupWorker(0, (0, 1), CheckpointWeights(ckpt))
    h = torch.zeros(1, 64)
    with pytest.raises(StaleRoutingError, match="holds 2 experts; got local id 2"):
        w.run(ExpertBatch(w.layers[0], h, torch.tensor([[2]]), torch.ones(1, 1)))
    with pytest.raises(StaleRoutingError, match="no MoE layer 99"):
        w.run(ExpertBatch(99, h, torch.tensor([[0]]), torch.ones(1, 1)))
    assert w.health()["in_flight"] == 0


def test_add_experts_keeps_local_ids_and_drain_refuses_new_rows(ckpt):
    w = ExpertGroupWorker(0, (0, 1), CheckpointWeights(ckpt))
    layer = w.layers[0]
    before = w._weights[layer][0].clone()
    assert w.add_experts([7, 1]) == (0, 1, 7)
    assert torch.equal(w._weights[layer][0][:2], before)
    assert torch.equal(w._weights[layer][0][2], load_expert_weights(ckpt, [7])[layer][0][0])
    w.begin_drain()
    assert w.wait_drained(0.0) and w.health()["draining"]
    with pytest.raises(GroupDrainingError, match="group 0 is draining"):
        w.run(ExpertBatch(layer, torch.zeros(1, 64), torch.tensor([[0]]), torch.ones(1, 1)))


def test_random_weights_do_not_depend_on_which_experts_load_together():
    src = RandomWeights(moe_layers=(1, 3), hidden_size=16, intermediate_size=8, num_experts=6, seed=4)
    a = src.load([4, 1], "cpu")
    b = src.load([1, 2, 4], "cpu")
    assert torch.equal(a[3][0][0], b[3][0][2]) and torch.equal(a[1][1][1], b[1][1][0])
    assert not torch.equal(a[1][0][0], a[3][0][0])
    with pytest.raises(ValueError, match="expert 6 outside 0..5"):
        src.load([6], "cpu")
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("int3")


def test_group_resources_ask_ray_for_gpus_or_a_custom_resource():
    from moeserve.experts.group import GroupResources

    opts = GroupResources(num_cpus=0.5, num_gpus=0.25, custom_resource="moeserve_expert_{group}").actor_options(3)
    assert opts == {"num_cpus": 0.5, "num_gpus": 0.25, "resources": {"moeserve_expert_3": 1}}
    with pytest.raises(ValueError, match="torch_threads: must be >= 1"):
        GroupResources(torch_threads=0)
