"""Run chaos scenarios: reference outputs once, then per scenario a fresh cluster, load and faults."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

from .cluster import EmbeddedCluster
from .faults import Fault
from .load import LoadGenerator
from .report import ChaosReport, FaultRecord, build_report
from .scenarios import Scenario
from .workload import Workload, reference_outputs

RECOVERY_TIMEOUT_S = 300.0  # a fault not recovered from in this long is reported as a fault error


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
                       prompts: list[list[int]], expected: list[list[int]], every_s: float | None = None) -> ChaosReport:
    """One scenario on a fresh embedded cluster: steady load until `workload.requests` are sent and `faults` done.

    Faults are spread over the requests, or come `every_s` seconds apart (after each recovery).
    """
    cluster = EmbeddedCluster(scenario.spec, model_dir)
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
        every_s: float | None = None, log: Callable[[str], None] = print) -> list[ChaosReport]:
    """Every scenario in turn (fault-free outputs computed once first); logs each report as it ends."""
    from moeserve.models.config import ModelConfig

    if model_dir is None:
        from moeserve.models.demo import ensure_demo_model

        model_dir = str(ensure_demo_model())
    prompts = workload.prompts(ModelConfig.from_dir(model_dir).vocab_size)
    reports = []
    with torch_threads(1), ray_running():
        expected = reference_outputs(model_dir, prompts, workload.max_tokens)
        for scenario in scenarios:
            log(f"chaos: {scenario.name}: {scenario.description}")
            report = asyncio.run(run_scenario(scenario, workload, faults, model_dir, prompts, expected, every_s))
            log(report.format())
            reports.append(report)
    return reports
