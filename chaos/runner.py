"""Run chaos scenarios: reference outputs once, then per scenario a fresh cluster, load and faults.

A `SharedExperts` passed to `run_scenario` lends consecutive scenarios one controller with its expert
groups (checked back to a fresh one's state before each); each scenario still gets its own edge and trunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

from .cluster import ClusterSpec, EmbeddedCluster, controller_config
from .faults import Fault
from .load import LoadGenerator
from .report import ChaosReport, FaultRecord, build_report
from .scenarios import Scenario
from .workload import Workload, reference_outputs

RECOVERY_TIMEOUT_S = 300.0  # a fault not recovered from in this long is reported as a fault error
SETTLE_S = 5.0  # a shared controller not back to a fresh one's state this long after a scenario is replaced


@contextlib.contextmanager
def ray_running(num_cpus: int | None = None) -> Iterator[None]:
    """Use the Ray already initialised here, or start a local one (own temp dir) and shut it down after."""
    import ray

    if ray.is_initialized():
        yield
        return
    tmp = tempfile.mkdtemp(prefix="rchaos", dir="/tmp")  # short: Ray's socket paths must stay short
    ray.init(num_cpus=num_cpus, _temp_dir=tmp, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run this process's torch on `count` BLAS threads (as the cluster's trunk and groups), then restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SharedExperts:
    """One controller with its expert groups, lent to the clusters of consecutive scenarios (each still with
    its own edge, trunk, dispatchers and faults) instead of each starting groups of its own. A scenario
    whose fault kills the controller (`Scenario.own_controller`) is not lent one: it starts its own.

    Before each lend after the first the controller must be as a freshly started one: every group with
    its experts of the intended placement and `replicas_per_group` replicas, all serving (none restarting,
    draining or failed), no expert uncovered, no dispatcher or observer still registered (the last
    scenario's all gone); and no replica keeps an injected delay (set back to 0 on each). One that is not
    within SETTLE_S, or is of another shape, is shut down and a fresh one started.
    """

    def __init__(self, model_dir: str, log: Callable[[str], None] = print):
        self.model_dir, self.log = model_dir, log
        self.controller = None
        self.started = 0  # controllers started
        self.lent = 0  # scenarios lent the current one
        self._shape: tuple | None = None
        self._config = None

    @staticmethod
    def shape(spec: ClusterSpec) -> tuple:
        """What of a cluster's spec its controller and groups are made of."""
        return spec.expert_groups, spec.replicas_per_group, spec.torch_threads

    async def lend(self, spec: ClusterSpec):
        """A running controller of `spec`'s shape, as a fresh one (see the class docstring)."""
        from moeserve.cluster.controller import start_controller

        if self.controller is not None:
            why = "another shape" if self.shape(spec) != self._shape else await self._unsettled(spec)
            if why is not None:
                self.log(f"chaos: a fresh controller: the shared one after {self.lent} scenario(s) is not as new "
                         f"({why})")
                await self.close()
        if self.controller is None:
            self._config = controller_config(spec, self.model_dir, f"chaos-shared-{uuid.uuid4().hex[:8]}")
            self.controller = await asyncio.to_thread(start_controller, self._config)
            self._shape, self.started, self.lent = self.shape(spec), self.started + 1, 0
        else:
            serving = await self.controller.snapshot.remote()
            # No fault an earlier scenario injected stays (each replica answers: none is gone or stuck).
            await asyncio.wait_for(asyncio.gather(*(handle.inject_delay.remote(0.0)
                                                    for handle in serving.handles.values())), 60.0)
        self.lent += 1
        return self.controller

    async def _unsettled(self, spec: ClusterSpec) -> str | None:
        """None once the controller is as a fresh one; else (after SETTLE_S) what is not."""
        from moeserve.cluster.placement import contiguous_groups

        deadline = time.monotonic() + SETTLE_S
        while True:
            status = await self.controller.status.remote()
            why = _unlike_fresh(status, contiguous_groups(self._config.num_experts, spec.expert_groups),
                                spec.replicas_per_group)
            if why is None or time.monotonic() > deadline:
                return why
            await asyncio.sleep(0.2)  # polling the controller's status; it has no wait for this

    async def close(self) -> None:
        """Shut the controller and its groups down (a scenario may start a new one after)."""
        import ray

        controller, self.controller = self.controller, None
        if controller is not None:
            try:
                await asyncio.wait_for(controller.shutdown.remote(), 120.0)
            finally:
                ray.kill(controller, no_restart=True)


def _unlike_fresh(status: dict, groups, replicas_per_group: int) -> str | None:
    """How a controller's `status()` differs from a fresh one's with `groups` (GroupSpecs) of
    `replicas_per_group` serving replicas each, and no dispatcher; None when it does not."""
    placed = [(g["group_id"], tuple(g["experts"])) for g in status["groups"]]
    if placed != [(g.group_id, tuple(g.experts)) for g in groups]:
        return f"placement {placed}"
    for g in status["groups"]:
        states = [(r["replica_id"], r["state"], r["serving"]) for r in g["replicas"]]
        if len(states) != replicas_per_group or not all(state == "serving" and serving for _, state, serving in states):
            return f"group {g['group_id']} replicas {states}"
    if status["unavailable_experts"]:
        return f"experts {status['unavailable_experts']} uncovered"
    if status["dispatchers"]:
        return f"{status['dispatchers']} dispatcher(s) still registered"
    return None


async def _inject(fault: Fault, cluster: EmbeddedCluster, load: LoadGenerator, count: int, warmup: int,
                  spacing: int, every_s: float | None, records: list[FaultRecord], errors: list[str]) -> None:
    """`count` faults: the first once `warmup` requests have completed; each next one `every_s` seconds
    after the last recovery, or (without `every_s`) once `spacing` more requests have completed."""
    target = warmup
    try:
        for i in range(count):
            await load.wait_completed(target)
            if every_s is not None and i > 0:
                await asyncio.sleep(every_s)  # the fault schedule itself, not a synchronisation
            try:
                records.append(await asyncio.wait_for(fault.inject(cluster, load), RECOVERY_TIMEOUT_S))
            except Exception as exc:  # noqa: BLE001 - reported, and the run stops
                errors.append(f"{fault.kind} #{len(records) + 1}: {exc!r}")
                return
            target = load.completed + (0 if every_s is not None else spacing)
    finally:
        await fault.clear(cluster)


async def run_scenario(scenario: Scenario, workload: Workload, faults: int, model_dir: str,
                       prompts: list[list[int]], expected: list[list[int]], every_s: float | None = None,
                       experts: SharedExperts | None = None) -> ChaosReport:
    """One scenario on a fresh embedded cluster: steady load until `workload.requests` are sent and `faults` done.

    Faults are spread over the requests, or come `every_s` seconds apart (after each recovery). With
    `experts`, the cluster's controller and expert groups are the shared ones (unless the scenario needs
    its own controller); its edge and trunk are its own.
    """
    controller = None
    if experts is not None and not scenario.own_controller:
        controller = await experts.lend(scenario.spec)
    cluster = EmbeddedCluster(scenario.spec, model_dir, controller)
    try:
        await cluster.start()
        load = LoadGenerator(cluster.address, workload, prompts)
        records: list[FaultRecord] = []
        errors: list[str] = []
        warmup = min(workload.concurrency, workload.requests)
        spacing = max(1, (workload.requests - warmup) // max(1, faults))
        injecting: asyncio.Task | None = None

        def keep_going(sent: int) -> bool:
            faults_pending = len(records) < faults and injecting is not None and not injecting.done()
            return sent < workload.requests or faults_pending

        start = time.monotonic()
        injecting = asyncio.create_task(
            _inject(scenario.make_fault(), cluster, load, faults, warmup, spacing, every_s, records, errors))
        outcomes = await load.run(keep_going)
        if not injecting.done():  # the load ended first (faults=0, or fewer requests than the warmup)
            injecting.cancel()
        try:
            await injecting
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - a bug in the fault schedule fails the run, visibly
            errors.append(f"fault schedule: {exc!r}")
        duration = time.monotonic() - start
    finally:
        await cluster.stop()
    return build_report(scenario.name, outcomes, expected, records, duration, errors)


def run(scenarios: list[Scenario], workload: Workload, faults: int, model_dir: str | None = None,
        every_s: float | None = None, log: Callable[[str], None] = print, transport: str = "ray") -> list[ChaosReport]:
    """Every scenario in turn (fault-free outputs computed once first), the trunk reaching the expert groups over
    `transport`; logs each report as it ends."""
    from moeserve.models.config import ModelConfig

    if model_dir is None:
        from moeserve.models.demo import ensure_demo_model

        model_dir = str(ensure_demo_model())
    prompts = workload.prompts(ModelConfig.from_dir(model_dir).vocab_size)
    reports = []
    with torch_threads(1), ray_running():
        expected = reference_outputs(model_dir, prompts, workload.max_tokens)
        for scenario in scenarios:
            scenario = dataclasses.replace(scenario, spec=dataclasses.replace(scenario.spec, transport=transport))
            log(f"chaos: {scenario.name}: {scenario.description}")
            report = asyncio.run(run_scenario(scenario, workload, faults, model_dir, prompts, expected, every_s))
            log(report.format())
            reports.append(report)
    return reports
