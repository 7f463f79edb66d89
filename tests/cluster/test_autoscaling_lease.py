"""One autoscaler acts on a cluster at a time: runners of several edges (the Helm chart's trunk pods) share
the controller's autoscaler lease; the others stand by and take over when the holder stops or goes silent."""

from __future__ import annotations

import time

import pytest
import ray

from moeserve.cluster.autoscaling import parse_config
from moeserve.cluster.autoscaling.runner import AutoscaleRunner
from moeserve.cluster.controller import ControllerConfig, start_controller
from moeserve.experts.group import GroupResources
from moeserve.experts.weights import CheckpointWeights

POLICY = {"policy": "target_utilisation", "interval_s": 0.5, "window_s": 5.0,
          "limits": {"expert_groups": {"min_replicas": 1, "max_replicas": 1}}, "redundant_experts": {"enabled": False}}


@pytest.fixture
def controller(private_ray, hf_checkpoint, actor_gone):
    handle = start_controller(ControllerConfig(
        weights=CheckpointWeights(str(hf_checkpoint("mixtral"))), num_experts=4, num_groups=1, name="lease",
        namespace="test-autoscaling-lease", resources=GroupResources(num_cpus=0, torch_threads=1)))
    yield handle
    ray.get(handle.shutdown.remote(), timeout=60)
    ray.kill(handle)
    actor_gone(handle)  # the module's next test starts a controller of the same name on the same Ray


def _said(runner: AutoscaleRunner) -> list[str]:
    return [e.message for e in runner.events if e.kind == "lease"]


def test_one_runner_acts_the_others_stand_by(controller):
    config = parse_config(POLICY)
    first, second = AutoscaleRunner(controller, config), AutoscaleRunner(controller, config)
    assert first.owner != second.owner
    assert first.tick() is not None
    assert second.tick() is None, "two autoscalers acted on one cluster"
    assert _said(second) == [f"standing by: the autoscaler {first.owner} acts on this cluster"]
    assert first.tick() is not None and second.tick() is None  # the holder renews; said once
    assert len(_said(second)) == 1
    first.stop()  # gives the lease up: the standby takes over at its next run
    assert second.tick() is not None
    assert _said(second)[-1] == f"acting on the cluster (autoscaler lease held by {second.owner})"
    assert first.tick() is None


def test_a_silent_holder_loses_the_lease(controller):
    holder = ray.get(controller.lease_autoscaler.remote("gone", 0.5))
    assert holder == "gone"
    runner = AutoscaleRunner(controller, parse_config(POLICY))
    assert runner.tick() is None
    time.sleep(0.6)
    assert runner.tick() is not None
    with pytest.raises(ValueError, match="ttl_s: must be > 0"):
        ray.get(controller.lease_autoscaler.remote("x", 0))
