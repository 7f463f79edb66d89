"""The chaos workload: prompts are deterministic, varied and in the vocabulary; settings are validated."""

from __future__ import annotations

import pytest

from moeserve.chaos.cluster import ClusterSpec
from moeserve.chaos.scenarios import SCENARIOS, resolve
from moeserve.chaos.workload import Workload


def test_prompts_are_deterministic_and_in_range():
    w = Workload(num_prompts=16, min_prompt_tokens=3, max_prompt_tokens=9, shared_prefix_tokens=0)
    a, b = w.prompts(512), w.prompts(512)
    assert a == b and len(a) == 16
    assert all(3 <= len(p) <= 9 and all(0 <= t < 512 for t in p) for p in a)
    assert len({len(p) for p in a}) > 1
    assert Workload(seed=1).prompts(512) != Workload(seed=0).prompts(512)


def test_every_other_prompt_shares_the_prefix():
    shared = Workload(num_prompts=6, min_prompt_tokens=3, max_prompt_tokens=9).prompts(512)
    plain = Workload(num_prompts=6, min_prompt_tokens=3, max_prompt_tokens=9, shared_prefix_tokens=0).prompts(512)
    prefix = shared[1][:32]
    assert all(p[:32] == prefix and p[32:] == q for p, q in zip(shared[1::2], plain[1::2]))
    assert shared[0::2] == plain[0::2]


@pytest.mark.parametrize("field,value", [("requests", 0), ("concurrency", 0), ("max_tokens", 0), ("deadline_s", 0.0),
                                         ("max_prompt_tokens", 1), ("shared_prefix_tokens", -1)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Workload(**{field: value})


def test_resolve_scenarios():
    assert [s.name for s in resolve(["all"])] == list(SCENARIOS)
    assert [s.name for s in resolve(["kill-controller", "slow-transport"])] == ["kill-controller", "slow-transport"]
    with pytest.raises(ValueError, match="nope"):
        resolve(["nope"])


@pytest.mark.parametrize("options,message", [
    ({"trunk_workers": 1}, r"trunk_workers must be 0 \(no pool\) or >= 2 .* got 1; for one trunk worker use "
                           r"trunk_worker=True"),
    ({"trunk_workers": -2}, "got -2"),
    ({"trunk_worker": True, "trunk_workers": 2}, "exclude each other"),
    ({"slow_transport": True, "trunk_workers": 3}, "slow_transport needs the trunk in the edge's process"),
])
def test_cluster_spec_refuses_trunk_combinations(options, message):
    with pytest.raises(ValueError, match=message):
        ClusterSpec(**options)
    assert ClusterSpec(trunk_workers=2).trunk_elsewhere and ClusterSpec(trunk_worker=True).trunk_elsewhere
    assert not ClusterSpec().trunk_elsewhere


def _status(replicas=(("g0r0", "serving", True), ("g1r0", "serving", True)), experts=((0, 1), (2, 3)),
            uncovered=(), dispatchers=0) -> dict:
    """A controller's status() of two groups, as far as a shared controller's check reads it."""
    groups = [{"group_id": g, "experts": list(e), "replicas": [
        {"replica_id": r, "state": state, "serving": serving} for r, state, serving in replicas if r[1] == str(g)]}
        for g, e in enumerate(experts)]
    return {"groups": groups, "unavailable_experts": list(uncovered), "dispatchers": dispatchers}


@pytest.mark.parametrize("status,why", [
    (_status(), None),
    (_status(replicas=(("g0r1", "serving", True), ("g1r2", "serving", True))), None),  # restarted, drained: as new
    (_status(experts=((0, 1, 2), (2, 3))), "placement"),  # an extra copy of expert 2
    (_status(experts=((0, 1, 2, 3),)), "placement"),  # a group gone
    (_status(replicas=(("g0r0", "restarting", True), ("g1r0", "serving", True))), "group 0 replicas"),
    (_status(replicas=(("g0r0", "serving", True), ("g0r1", "draining", False), ("g1r0", "serving", True))),
     "group 0 replicas"),
    (_status(replicas=(("g0r0", "serving", True), ("g1r0", "failed", False))), "group 1 replicas"),
    (_status(replicas=(("g0r0", "serving", True), ("g0r1", "serving", True), ("g1r0", "serving", True))),
     "group 0 replicas"),  # a replica more than the spec's
    (_status(uncovered=(2,)), "uncovered"),
    (_status(dispatchers=2), "2 dispatcher(s) still registered"),  # a last scenario's not yet closed, say
])
def test_a_shared_controller_is_lent_again_only_as_new(status, why):
    from moeserve.chaos.runner import _unlike_fresh
    from moeserve.cluster.placement import contiguous_groups

    said = _unlike_fresh(status, contiguous_groups(4, 2), replicas_per_group=1)
    assert said is None if why is None else why in said, said
