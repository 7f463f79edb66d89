"""Expert backends for a model: factories for the engine's `EngineConfig.expert_backend` hook.

Each factory takes the loaded model and returns the callable its MoE layers use,
`(layer_id, hidden, topk_ids, topk_weights) -> [T, H]`: an `ExpertDispatcher` over the `ray`
transport (expert groups as Ray actors, placement from the controller) or the `local` one (groups
as in-process workers, a fixed placement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moeserve.cluster.placement import Placement, ServingSet, contiguous_groups
from moeserve.router.dispatch import DispatchConfig, ExpertDispatcher, StaticSource
from moeserve.router.transport.local import LocalTransport

from .group import GroupResources, check_resource_template
from .weights import CheckpointWeights
from .worker import ExpertGroupWorker


def _model_layout(model) -> tuple[list[int], int, torch.device]:
    layers = sorted(model.moe_blocks)
    num_experts = model.config.moe.n_routed_experts
    device = next(model.parameters()).device
    return layers, num_experts, device


def local_serving_set(weights, num_experts: int, num_groups: int = 1, device: torch.device | str = "cpu") -> ServingSet:
    """In-process groups over contiguous expert ranges, one replica each, at epoch 1."""
    groups = contiguous_groups(num_experts, num_groups)
    workers = {f"g{g.group_id}r0": ExpertGroupWorker(g.group_id, g.experts, weights, device) for g in groups}
    placement = Placement(num_experts, groups, tuple((g.group_id, (f"g{g.group_id}r0",)) for g in groups), epoch=1)
    return ServingSet(placement, workers, {r: 0 for r in workers})


def local_expert_backend(weights, *, num_groups: int = 1, config: DispatchConfig | None = None) -> Callable:
    """Factory: the model's experts in `num_groups` in-process groups behind the dispatcher.

    `weights` is a weight source, or a checkpoint path whose experts load in the model's dtype.
    """

    def make(model) -> ExpertDispatcher:
        layers, num_experts, device = _model_layout(model)
        nonlocal weights
        if isinstance(weights, str):
            weights = checkpoint_weights(weights, model)
        serving = local_serving_set(weights, num_experts, num_groups, device)
        return ExpertDispatcher(StaticSource(serving), LocalTransport(), layers, num_experts=num_experts, config=config)

    return make


def checkpoint_weights(path: str, model) -> CheckpointWeights:
    """The experts of checkpoint `path` in the dtype of `model`'s trunk."""
    return CheckpointWeights(str(path), dtype=str(next(model.parameters()).dtype).removeprefix("torch."))


def ray_expert_backend(controller, *, config: DispatchConfig | None = None, watch_timeout_s: float = 10.0) -> Callable:
    """Factory: the model's experts in the Ray expert groups that `controller` (an actor handle) runs."""

    def make(model) -> ExpertDispatcher:
        from moeserve.cluster.epoch import ControllerSource
        from moeserve.router.transport.ray import RayTransport

        layers, num_experts, _ = _model_layout(model)
        source = ControllerSource(controller, watch_timeout_s=watch_timeout_s)
        return ExpertDispatcher(source, RayTransport(), layers, num_experts=num_experts, config=config)

    return make


def _start_admin(controller):
    """The Admin API beside the embedded cluster (MOESERVE_ADMIN_PORT, default 50052; "off" disables it)."""
    import atexit
    import os

    from moeserve.cluster.admin_server import ADMIN_PORT_ENV, AdminConfig, AdminServer

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

    from moeserve.cluster.autoscaling.runner import AutoscaleRunner

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

    The trunk's dispatchers reach the groups through `ray_expert_backend(plane.controller)`, in this
    process or in trunk workers (serve --trunk-workers), which is why this is apart from the model.
    """
    import ray

    from moeserve.cluster.controller import ControllerConfig, start_controller

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


def embedded_expert_backend(model_path: str, *, transport: str = "ray", num_groups: int = 2,
                            resources: GroupResources | None = None, custom_resource: str | None = None,
                            autoscaling=None) -> Callable:
    """Factory for `moeserve serve --expert-groups N --transport T`: `ray` starts (or joins) Ray here, the
    controller and its N expert-group actors; `local` runs N in-process groups.

    `custom_resource` (`--expert-resource`, e.g. "moeserve_expert_{group}") is the Ray resource each
    group's replicas ask one unit of when `resources` is not given.
    """
    if transport not in ("local", "ray"):
        raise ValueError(f"transport: {transport!r} is not one of ['local', 'ray']")
    if num_groups < 1:
        raise ValueError(f"expert_groups: must be >= 1, got {num_groups}")
    if custom_resource is not None:
        if transport == "local":
            raise ValueError("custom_resource: only Ray expert groups ask for resources (transport 'ray')")
        check_resource_template(custom_resource)
    if transport == "local":
        return local_expert_backend(str(model_path), num_groups=num_groups)

    def make(model) -> ExpertDispatcher:
        _, num_experts, _ = _model_layout(model)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        plane = start_control_plane(model_path, num_experts=num_experts, dtype=dtype, num_groups=num_groups,
                                    resources=resources, custom_resource=custom_resource, autoscaling=autoscaling)
        dispatcher = ray_expert_backend(plane.controller)(model)
        dispatcher.admin, dispatcher.autoscaler = plane.admin, plane.autoscaler
        return dispatcher

    return make
