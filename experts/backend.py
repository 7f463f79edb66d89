"""Expert backends for a model: factories for the engine's `EngineConfig.expert_backend` hook.

Each factory takes the loaded model and returns the callable its MoE layers use,
`(layer_id, hidden, topk_ids, topk_weights) -> [T, H]`: an `ExpertDispatcher` over the `ray` or
`gloo` transport (expert groups as Ray actors, placement from the controller) or the `local` one
(groups as in-process workers, a fixed placement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moeserve.cluster.placement import Placement, ServingSet, contiguous_groups
from moeserve.router.dispatch import DispatchConfig, ExpertDispatcher, StaticSource
from moeserve.router.transport import ACTOR_TRANSPORTS, TRANSPORTS, make_transport
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


@dataclass(frozen=True)
class RayExpertBackend:
    """Factory (model -> ExpertDispatcher): the model's experts in the Ray expert groups that `controller` (an
    actor handle) runs. `dispatcher_id` is the name the dispatcher registers under with the controller (None: a
    fresh one); who picks it can have the controller forget it when the process that registered it dies before it
    could say so (a trunk worker killed while starting), instead of a drain waiting dispatcher_ttl_s for it."""

    controller: Any
    config: DispatchConfig | None = None
    watch_timeout_s: float = 10.0
    dispatcher_id: str | None = None
    transport: str = "ray"  # how rows reach the actors: "ray" (an actor call each) or "gloo" (standing channels)

    def __post_init__(self) -> None:
        _check_transport(self.transport, ACTOR_TRANSPORTS)

    def __call__(self, model) -> ExpertDispatcher:
        from moeserve.cluster.epoch import ControllerSource

        layers, num_experts, _ = _model_layout(model)
        source = ControllerSource(self.controller, dispatcher_id=self.dispatcher_id, watch_timeout_s=self.watch_timeout_s)
        return ExpertDispatcher(source, make_transport(self.transport), layers, num_experts=num_experts,
                                config=self.config)


def ray_expert_backend(controller, *, config: DispatchConfig | None = None, watch_timeout_s: float = 10.0,
                       transport: str = "ray") -> RayExpertBackend:
    """Factory: the model's experts in the Ray expert groups that `controller` (an actor handle) runs,
    reached over `transport` ("ray" or "gloo")."""
    return RayExpertBackend(controller, config, watch_timeout_s, transport=transport)


def _check_transport(transport: str, allowed: tuple[str, ...]) -> None:
    if transport not in allowed:
        raise ValueError(f"transport: {transport!r} is not one of {list(allowed)}")


def embedded_expert_backend(model_path: str, *, transport: str = "ray", num_groups: int = 2,
                            resources: GroupResources | None = None, custom_resource: str | None = None,
                            autoscaling=None) -> Callable:
    """Factory for `moeserve serve --expert-groups N --transport T`: `ray` and `gloo` start (or join) Ray
    here, the controller and its N expert-group actors, reached by actor calls or standing gloo channels;
    `local` runs N in-process groups.

    `custom_resource` (`--expert-resource`, e.g. "moeserve_expert_{group}") is the Ray resource each
    group's replicas ask one unit of when `resources` is not given.
    """
    _check_transport(transport, TRANSPORTS)
    if num_groups < 1:
        raise ValueError(f"expert_groups: must be >= 1, got {num_groups}")
    if custom_resource is not None:
        if transport == "local":
            raise ValueError("custom_resource: only Ray expert groups ask for resources (transport 'ray' or 'gloo')")
        check_resource_template(custom_resource)
    if transport == "local":
        return local_expert_backend(str(model_path), num_groups=num_groups)

    def make(model) -> ExpertDispatcher:
        _, num_experts, _ = _model_layout(model)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        from moeserve.cluster.control_plane import start_control_plane

        plane = start_control_plane(model_path, num_experts=num_experts, dtype=dtype, num_groups=num_groups,
                                    resources=resources, custom_resource=custom_resource, autoscaling=autoscaling)
        dispatcher = ray_expert_backend(plane.controller, transport=transport)(model)
        dispatcher.control_plane = plane  # serve hands it the edge's figures (cluster/cli/serve.py)
        return dispatcher

    return make
