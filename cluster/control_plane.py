"""The embedded cluster's control plane, started in one process: the controller (a Ray actor) with its
expert groups, the Admin API beside it and the autoscaler.

`moeserve serve` starts it where the edge's figures are: from the model's expert backend when the
trunk runs in the edge's process (experts/backend.py `embedded_expert_backend`), or in the edge
itself when the trunk runs in trunk workers (cluster/cli/serve.py `edge_control_plane`); the trunk's
dispatchers then reach the groups through `ray_expert_backend(plane.controller)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeserve.experts.group import GroupResources
from moeserve.experts.weights import CheckpointWeights


def _start_admin(controller):
    """The Admin API beside the embedded cluster (MOESERVE_ADMIN_PORT, default 50052; "off" disables it)."""
    import atexit
    import os

    from .admin_server import ADMIN_PORT_ENV, AdminConfig, AdminServer

    if os.environ.get(ADMIN_PORT_ENV, "").lower() == "off":
        return None
    server = AdminServer(controller, AdminConfig.from_env()).start()
    print(f"moeserve: admin API (status, scale, drain) on {server.address}; try  moeserve status --address "
          f"{server.address}", flush=True)
    atexit.register(server.stop, 0)
    return server


def _start_autoscaler(controller, config):
    """The autoscaling policy (cluster/autoscaling) running on the controller's live metrics; serve attaches
    the edge's engine as the trunk's report once it is built (cluster/cli/serve.py)."""
    import atexit

    from .autoscaling.runner import AutoscaleRunner

    runner = AutoscaleRunner(controller, config).start()
    atexit.register(runner.stop)
    print(f"moeserve: autoscaling expert groups with the {config.policy} policy every {config.interval_s:g}s",
          flush=True)
    return runner


@dataclass
class ControlPlane:
    """The embedded cluster's control plane, run in one process: the controller (a Ray actor; its handle),
    the Admin API server beside it and the autoscaler (None when off)."""

    controller: Any
    admin: Any = None
    autoscaler: Any = None
    utilisation: Any = None  # cluster.group_utilisation.GroupUtilisationPoller, when serve runs one

    def stop(self) -> None:
        """Stop the autoscaler, the utilisation poller and the admin API (the controller and its groups stay)."""
        for part in (self.autoscaler, self.utilisation):
            if part is not None:
                part.stop()
        if self.admin is not None:
            self.admin.stop(0)


def start_control_plane(model_path: str, *, num_experts: int, dtype: str, num_groups: int = 2,
                        resources: GroupResources | None = None, custom_resource: str | None = None,
                        autoscaling=None) -> ControlPlane:
    """Start (or join) Ray here, the controller and its `num_groups` expert-group actors holding the experts
    of `model_path` in `dtype`, the Admin API and, with an `autoscaling` config, the autoscaler.

    """
    import ray

    from .controller import ControllerConfig, start_controller

    if not ray.is_initialized():
        ray.init(include_dashboard=False, namespace="moeserve")
    gpus = ray.cluster_resources().get("GPU", 0)
    # One GPU each when there are enough; else the groups share what there is (one GPU: all on it).
    res = resources or GroupResources(num_gpus=min(1.0, gpus / num_groups) if gpus else 0.0,
                                      custom_resource=custom_resource, torch_threads=torch.get_num_threads())
    cfg = ControllerConfig(weights=CheckpointWeights(str(model_path), dtype=dtype), num_experts=num_experts,
                           num_groups=num_groups, resources=res)
    controller = start_controller(cfg)
    return ControlPlane(controller, _start_admin(controller),
                        _start_autoscaler(controller, autoscaling) if autoscaling is not None else None)
