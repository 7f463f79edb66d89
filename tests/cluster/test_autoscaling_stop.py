"""AutoscaleRunner.stop may run more than once: `moeserve serve` registers it at exit as well. A second stop
does nothing, and a stop once Ray is shut down starts no new Ray (a call on an actor handle then would)."""

from __future__ import annotations

import threading

import pytest
import ray

from moeserve.cluster.autoscaling import parse_config
from moeserve.cluster.autoscaling.runner import AutoscaleRunner

POLICY = {"policy": "target_utilisation", "interval_s": 0.5, "window_s": 5.0,
          "limits": {"expert_groups": {"min_replicas": 1, "max_replicas": 1}}, "redundant_experts": {"enabled": False}}


@ray.remote(num_cpus=0)
class StandIn:
    """The controller's calls a runner makes, lease as in ExpertController; counts the releases asked."""

    def __init__(self):
        self.holder: str | None = None
        self.releases = 0

    def lease_autoscaler(self, owner: str, ttl_s: float) -> str:
        self.holder = self.holder or owner
        return self.holder

    def release_autoscaler(self, owner: str) -> None:
        self.releases += 1
        if self.holder == owner:
            self.holder = None

    def status(self) -> dict:
        return {"num_experts": 2, "expert_load_by_layer": {}, "groups": [{"group_id": 0, "experts": [0, 1], "replicas": [
            {"replica_id": "g0r0", "state": "serving", "serving": True, "busy_share": 0.0}]}]}

    def lease(self) -> tuple[str | None, int]:
        return self.holder, self.releases


@pytest.fixture
def own_ray(tmp_path_factory):
    """A Ray of this test's own: the test shuts it down itself; shut down again after (a no-op then)."""
    ray.init(num_cpus=1, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False,
             namespace="test-autoscaling-stop")
    yield
    ray.shutdown()


def test_stop_twice_and_after_ray_is_shut_down(own_ray):
    controller = StandIn.remote()
    runner = AutoscaleRunner(controller, parse_config(POLICY))
    assert runner.tick() is not None
    assert ray.get(controller.lease.remote()) == (runner.owner, 0)
    runner.stop()
    assert ray.get(controller.lease.remote()) == (None, 1)
    runner.stop()  # stopped already: no second release
    assert ray.get(controller.lease.remote()) == (None, 1)

    # A runner holding the lease when Ray is shut down under it (a test's Ray ends before serve's exit stops).
    later = AutoscaleRunner(controller, parse_config(POLICY))
    assert later.tick() is not None and ray.get(controller.lease.remote())[0] == later.owner
    ray.shutdown()
    loop = threading.Thread(target=later.run, daemon=True)
    loop.start()
    loop.join(10.0)
    assert not loop.is_alive(), "the policy loop kept running without Ray"
    later.stop()
    later.stop()
    assert not ray.is_initialized(), "a stop started a new Ray to reach a controller of the Ray shut down"
