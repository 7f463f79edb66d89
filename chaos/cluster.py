"""The embedded cluster a chaos scenario runs against: real gRPC edge on loopback, real Ray actors.

Edge (InferenceServer) and load generator share this process and its event loop. The trunk runs
in this process too, or in its own TrunkWorker actor, or in several behind a TrunkPool; the routed
experts run in Ray expert-group actors under a controller actor, reached over the `ray` transport (or `gloo`)
(optionally slowed). Ray itself must already be initialised (the runner does it).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import RayActorError

from moeserve.router.config import EngineConfig
from moeserve.router.server import InferenceServer, ServerConfig
from moeserve.router.transport import ACTOR_TRANSPORTS

from .slow_transport import SlowTransport


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The shape of one embedded cluster."""

    expert_groups: int = 2
    replicas_per_group: int = 1
    trunk_worker: bool = False  # the trunk in its own process (a TrunkWorker actor), not the edge's
    # >= 2: the trunk in that many TrunkWorker actors behind a TrunkPool (scaled live); 0: not (see trunk_worker).
    trunk_workers: int = 0
    transport: str = "ray"  # how the trunk reaches the groups: "ray" (actor calls) or "gloo" (standing channels)
    slow_transport: bool = False  # the transport behind a SlowTransport (trunk in the edge's process)
    dispatch_timeout_s: float = 2.0  # one send to an expert group; past it the group counts as stalled
    # The trunk worker's: holding requests without a step for this long, it is killed and restarted.
    trunk_stall_timeout_s: float = 60.0
    max_num_seqs: int = 32
    num_kv_blocks: int = 512
    # BLAS threads of the trunk and of every group; the runner's process (the in-process trunk, the
    # reference) uses the same, so results stay bitwise equal. 1 keeps several processes from
    # spinning OpenMP pools against each other on a small machine.
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.expert_groups < 1:
            raise ValueError(f"ClusterSpec.expert_groups must be >= 1, got {self.expert_groups}")
        if self.replicas_per_group < 1:
            raise ValueError(f"ClusterSpec.replicas_per_group must be >= 1, got {self.replicas_per_group}")
        if not self.trunk_stall_timeout_s > 0:
            raise ValueError(f"ClusterSpec.trunk_stall_timeout_s must be > 0, got {self.trunk_stall_timeout_s}")
        if self.trunk_workers != 0 and self.trunk_workers < 2:
            raise ValueError(f"ClusterSpec.trunk_workers must be 0 (no pool) or >= 2 (a TrunkPool of that many), "
                             f"got {self.trunk_workers}; for one trunk worker use trunk_worker=True")
        if self.trunk_worker and self.trunk_workers:
            raise ValueError(f"ClusterSpec.trunk_worker=True (one TrunkEngine) and trunk_workers="
                             f"{self.trunk_workers} (a TrunkPool) exclude each other; set one of them")
        if self.transport not in ACTOR_TRANSPORTS:
            raise ValueError(f"ClusterSpec.transport must be one of {list(ACTOR_TRANSPORTS)}, got {self.transport!r}")
        if self.slow_transport and (self.trunk_worker or self.trunk_workers):
            raise ValueError("ClusterSpec.slow_transport needs the trunk in the edge's process "
                             "(trunk_worker=False, trunk_workers=0)")

    @property
    def trunk_elsewhere(self) -> bool:
        """Whether the trunk runs in TrunkWorker actors (one, or a pool) rather than the edge's process."""
        return self.trunk_worker or self.trunk_workers > 0


def controller_config(spec: ClusterSpec, model_dir: str, name: str):
    """The controller (and expert groups) of a cluster of `spec`'s shape, named `name`."""
    from moeserve.cluster.controller import ControllerConfig
    from moeserve.experts.group import GroupResources
    from moeserve.experts.weights import CheckpointWeights
    from moeserve.models.config import ModelConfig

    return ControllerConfig(
        weights=CheckpointWeights(model_dir, dtype="float32"),
        num_experts=ModelConfig.from_dir(model_dir).moe.n_routed_experts,
        num_groups=spec.expert_groups, replicas_per_group=spec.replicas_per_group,
        resources=GroupResources(torch_threads=spec.torch_threads),
        name=name, health_interval_s=1.0, max_restarts=10_000, drain_timeout_s=60.0,
    )


class EmbeddedCluster:
    """Start with `await start()`, stop with `await stop()`; `address` is the edge's loopback address."""

    def __init__(self, spec: ClusterSpec, model_dir: str, controller=None):
        """`controller`: a running controller (of `controller_config(spec, ...)`'s shape) to use instead of
        starting one; `stop` then leaves it (and its groups) running, for its owner to stop."""
        self.spec, self.model_dir = spec, model_dir
        self.name = f"chaos-{uuid.uuid4().hex[:8]}"
        self.controller = controller
        self._own_controller = controller is None
        self.engine = None
        self.server: InferenceServer | None = None
        self.transport: SlowTransport | None = None
        self._dispatchers: list = []  # made in this process; closed on stop

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        from moeserve.cluster.controller import start_controller

        spec = self.spec
        if torch.get_num_threads() != spec.torch_threads:
            raise ValueError(f"ClusterSpec.torch_threads is {spec.torch_threads} but this process runs "
                             f"{torch.get_num_threads()}; use chaos.runner.torch_threads() around the run")
        if self.controller is None:
            self.controller = await asyncio.to_thread(start_controller, controller_config(spec, self.model_dir,
                                                                                          self.name))
        engine_config = EngineConfig(model=self.model_dir, max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=512,
                                     num_kv_blocks=spec.num_kv_blocks, expert_backend=self._backend(),
                                     load_experts=False)
        if spec.trunk_workers:
            from moeserve.router.trunk_pool import TrunkPool

            self.engine = TrunkPool(engine_config, replicas=spec.trunk_workers, torch_threads=spec.torch_threads,
                                    stall_timeout_s=spec.trunk_stall_timeout_s)
        elif spec.trunk_worker:
            from moeserve.router.trunk import TrunkEngine

            self.engine = TrunkEngine(engine_config, torch_threads=spec.torch_threads,
                                      stall_timeout_s=spec.trunk_stall_timeout_s)
        else:
            from moeserve.router.engine import AsyncEngine

            self.engine = await asyncio.to_thread(AsyncEngine.from_config, engine_config)
        self.server = InferenceServer(self.engine, ServerConfig(port=0, max_streams_per_caller=100_000, grace_s=0),
                                      model_name="demo")
        await self.server.start()
        if self.spec.trunk_workers:  # the pool serves once one worker does: let all of them start first
            await self.engine.settled()

    def _backend(self):
        from moeserve.router.dispatch import DispatchConfig

        dispatch = DispatchConfig(timeout_s=self.spec.dispatch_timeout_s, recovery_timeout_s=300.0, max_rounds=50)
        if self.spec.trunk_elsewhere:  # built in the workers' processes: only picklable things travel
            from moeserve.experts.backend import ray_expert_backend

            return ray_expert_backend(self.controller, config=dispatch, transport=self.spec.transport)
        from moeserve.cluster.epoch import ControllerSource
        from moeserve.router.dispatch import ExpertDispatcher
        from moeserve.router.transport import make_transport

        def make(model) -> ExpertDispatcher:
            transport = make_transport(self.spec.transport)
            if self.spec.slow_transport:
                transport = self.transport = SlowTransport(transport)
            dispatcher = ExpertDispatcher(ControllerSource(self.controller), transport, sorted(model.moe_blocks),
                                          num_experts=model.config.moe.n_routed_experts, config=dispatch)
            self._dispatchers.append(dispatcher)
            return dispatcher

        return make

    async def stop(self) -> None:
        """Stop whatever `start` got to start (it may have failed half-way); a controller given is left running."""
        if self.server is not None:
            await self.server.stop(0)
        for dispatcher in self._dispatchers:
            await asyncio.to_thread(dispatcher.close)
        if self.controller is not None and self._own_controller:
            try:
                for attempt in range(3):  # a controller still restarting after a kill refuses the first calls
                    try:
                        await asyncio.wait_for(self.controller.shutdown.remote(), 120.0)
                        break
                    except RayActorError:
                        if attempt == 2:
                            raise
            finally:
                ray.kill(self.controller, no_restart=True)
