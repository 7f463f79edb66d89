"""Every chaos scenario, shortened: a live embedded cluster under steady load, two faults, nothing lost.

The scenarios share one controller with its expert groups (chaos.runner.SharedExperts: checked back to a
fresh one's state before each, replaced when it is not); each has its own edge and trunk. Those whose
fault kills the controller start their own.

The full runs (200+ requests, 10+ faults each) are `moeserve chaos all`; docs/chaos.md has their results.
"""

from __future__ import annotations

import dataclasses

import pytest

from moeserve.chaos.runner import SharedExperts, run_scenario
from moeserve.chaos.scenarios import SCENARIOS
from moeserve.chaos.workload import Workload, reference_outputs

WORKLOAD = Workload(requests=20, concurrency=6, max_tokens=8, num_prompts=12)
FAULTS = 2


@pytest.fixture(scope="module")
def fault_free(ray_cluster, demo_model_dir):
    """The workload's prompts and their greedy outputs from an undisturbed single-process engine."""
    from moeserve.models.config import ModelConfig

    prompts = WORKLOAD.prompts(ModelConfig.from_dir(demo_model_dir).vocab_size)
    return prompts, reference_outputs(str(demo_model_dir), prompts, WORKLOAD.max_tokens)


@pytest.fixture(scope="module")
def shared_experts(ray_cluster, demo_model_dir):
    import asyncio

    experts = SharedExperts(str(demo_model_dir))
    yield experts
    asyncio.run(experts.close())


# Those with a controller of their own last: the shared one serves every other scenario in between.
ORDER = [s.name for s in sorted(SCENARIOS.values(), key=lambda s: s.own_controller)]


@pytest.mark.parametrize("name", ORDER)
async def test_scenario_loses_nothing(name, ray_cluster, demo_model_dir, fault_free, shared_experts):
    prompts, expected = fault_free
    report = await run_scenario(SCENARIOS[name], WORKLOAD, FAULTS, str(demo_model_dir), prompts, expected,
                                experts=shared_experts)
    print(report.format())
    assert report.faults == FAULTS, report.format()
    assert report.sent >= WORKLOAD.requests
    assert report.ok and report.expired == 0, report.format()
    assert report.succeeded == report.sent
    assert report.cached_prompt_tokens > 0, "the shared prefix should have come from a prefix cache"


@pytest.mark.parametrize("name", ["kill-expert-group", "stall-expert-group", "slow-transport", "drain-during-burst"])
async def test_scenario_loses_nothing_over_gloo(name, ray_cluster, demo_model_dir, fault_free, shared_experts):
    """The expert-group faults and a drain again, the trunk reaching the groups over gloo channels
    (`--transport gloo`)."""
    prompts, expected = fault_free
    scenario = SCENARIOS[name]
    scenario = dataclasses.replace(scenario, spec=dataclasses.replace(scenario.spec, transport="gloo"))
    report = await run_scenario(scenario, WORKLOAD, FAULTS, str(demo_model_dir), prompts, expected,
                                experts=shared_experts)
    print(report.format())
    assert report.faults == FAULTS and report.sent >= WORKLOAD.requests, report.format()
    assert report.ok and report.expired == 0 and report.succeeded == report.sent, report.format()
