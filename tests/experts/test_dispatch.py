"""Dispatch and combine over in-process groups: bit-for-bit the single-process expert computation."""

from __future__ import annotations

import pytest
import torch

from moeserve.cluster.placement import GroupSpec, Placement, ServingSet, contiguous_groups
from moeserve.experts.weights import RandomWeights
from moeserve.experts.worker import ExpertGroupWorker
from moeserve.kernels import ops
from moeserve.router.dispatch import DispatchConfig, ExpertDispatcher, StaticSource
from moeserve.router.errors import ExpertsUnavailableError
from moeserve.router.transport import make_transport
from moeserve.router.transport.local import LocalTransport

E, H, I, K = 8, 64, 32, 3
SOURCE = RandomWeights(moe_layers=(1, 2), hidden_size=H, intermediate_size=I, num_experts=E, seed=7)


def _serving(placement: Placement) -> ServingSet:
    workers = {}
    for gid, reps in placement.replicas:
        for r in reps:
            workers[r] = ExpertGroupWorker(gid, placement.group(gid).experts, SOURCE)
    return ServingSet(placement, workers, {r: 0 for r in workers})


def _routing(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    ids[: tokens // 2, 0] = 5  # a hot expert
    weights = torch.rand(tokens, K, generator=g)
    return hidden, ids, weights


def _reference(layer: int, hidden, ids, weights):
    w13, w2 = SOURCE.load(list(range(E)), "cpu")[layer]
    return ops.fused_experts(hidden, w13, w2, ids, weights)


def _layouts():
    two = Placement(E, contiguous_groups(E, 2), ((0, ("a",)), (1, ("b",))), epoch=1)
    four = Placement(E, contiguous_groups(E, 4), tuple((g, (f"g{g}",)) for g in range(4)), epoch=1)
    hot = two.with_replica(0, "a2").with_replica(1, "b2").with_expert(0, 5)  # expert 5 also in group 0
    # Each group's experts far apart in pair order (its rows gathered from several ranges), local ids not ascending.
    interleaved = Placement(E, (GroupSpec(0, (6, 4, 2, 0)), GroupSpec(1, (1, 3, 5, 7))), ((0, ("e",)), (1, ("o",))),
                            epoch=1)
    return {"one": Placement(E, contiguous_groups(E, 1), ((0, ("x",)),), epoch=1), "two": two, "four": four, "hot": hot,
            "interleaved": interleaved}


@pytest.mark.parametrize("layout", ["one", "two", "four", "hot", "interleaved"])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_dispatch_equals_single_process_bitwise(layout, tokens):
    d = ExpertDispatcher(StaticSource(_serving(_layouts()[layout])), LocalTransport(), [1, 2], num_experts=E)
    for layer in (1, 2):
        hidden, ids, weights = _routing(tokens, seed=tokens * 10 + layer)
        assert torch.equal(d(layer, hidden, ids, weights), _reference(layer, hidden, ids, weights))
    assert d.step == 1  # layers 1 then 2 are one step


def test_hot_expert_rows_spread_over_replicas():
    serving = _serving(_layouts()["hot"])
    d = ExpertDispatcher(StaticSource(serving), LocalTransport(), [1, 2], num_experts=E)
    for step in range(6):
        hidden, ids, weights = _routing(16, seed=step)
        d(1, hidden, ids, weights)
    holders = {r: w.stats()["per_layer"].get(1, {}).get(5, 0) for r, w in serving.handles.items()}
    assert sum(1 for n in holders.values() if n) >= 2, holders


def test_draining_replica_rows_go_to_another_replica():
    serving = _serving(_layouts()["hot"])
    serving.handles["a"].begin_drain()
    d = ExpertDispatcher(StaticSource(serving), LocalTransport(), [1, 2], num_experts=E)
    hidden, ids, weights = _routing(20, seed=3)
    assert torch.equal(d(1, hidden, ids, weights), _reference(1, hidden, ids, weights))
    assert d.counters["recoveries"] >= 1 and serving.handles["a"].stats()["rows"] == 0


def test_experts_without_a_live_replica_raise_naming_them():
    serving = _serving(_layouts()["two"])
    serving.handles["b"].begin_drain()
    d = ExpertDispatcher(StaticSource(serving), LocalTransport(), [1, 2], num_experts=E,
                         config=DispatchConfig(timeout_s=1.0, recovery_timeout_s=1.0))
    hidden, ids, weights = _routing(8, seed=4)
    with pytest.raises(ExpertsUnavailableError) as err:
        d(1, hidden, ids, weights)
    assert set(err.value.experts) <= {4, 5, 6, 7} and err.value.experts
    assert not d._in_step  # the failed step is over: a new serving set would be adopted at once


def test_bad_arguments_are_named():
    serving = _serving(_layouts()["two"])
    with pytest.raises(ValueError, match="num_experts"):
        ExpertDispatcher(StaticSource(serving), LocalTransport(), [1], num_experts=16)
    with pytest.raises(ValueError, match="moe_layers"):
        ExpertDispatcher(StaticSource(serving), LocalTransport(), [])
    with pytest.raises(ValueError, match="timeout_s"):
        DispatchConfig(timeout_s=0)
    with pytest.raises(ValueError, match="transport"):
        make_transport("carrier-pigeon")


def test_routed_tokens_and_epochs_reach_telemetry():
    from moeserve.cluster.telemetry import Telemetry

    tel = Telemetry()
    try:
        d = ExpertDispatcher(StaticSource(_serving(_layouts()["two"])), LocalTransport(), [1, 2], num_experts=E)
        d.attach_telemetry(tel)
        hidden, ids, weights = _routing(6, seed=9)
        d(1, hidden, ids, weights)
        d(2, hidden, ids, weights)
        d.load.flush(tel, force=True)
        tokens = tel.snapshot()["expert_tokens"]
        assert sum(tokens.values()) == 2 * 6 * K
        assert tokens["expert=5,layer=1"] == int((ids == 5).sum())
    finally:
        tel.shutdown()
