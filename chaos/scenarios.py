"""The chaos scenarios: one cluster shape and one kind of fault each, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .cluster import ClusterSpec
from .faults import (DrainDuringBurst, Fault, KillController, KillControllerMidRestart, KillExpertGroup, KillTrunk,
                     ScaleTrunkWorkers, SlowTransport, StallExpertGroup, StallTrunk)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    spec: ClusterSpec
    make_fault: Callable[[], Fault]
    # Its fault kills the controller: it runs on a controller of its own, never on one shared with other
    # scenarios (chaos.runner.SharedExperts), so none runs after it on a restarted controller.
    own_controller: bool = False


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("kill-expert-group", "ray.kill an expert-group replica; its rows go to the restarted replica",
             ClusterSpec(), KillExpertGroup),
    Scenario("stall-expert-group", "a replica holds its batches far past the dispatch deadline; it is replaced",
             ClusterSpec(dispatch_timeout_s=1.0), lambda: StallExpertGroup(stall_s=60.0)),
    Scenario("kill-trunk-worker", "ray.kill the trunk worker; the edge restarts it and resubmits its requests",
             ClusterSpec(trunk_worker=True), KillTrunk),
    Scenario("stall-trunk-worker", "the trunk worker stops stepping, still answering; the edge restarts it after 2 s",
             ClusterSpec(trunk_worker=True, trunk_stall_timeout_s=2.0), lambda: StallTrunk(stall_s=60.0)),
    Scenario("scale-trunk-workers", "drain one of two trunk workers, then add one back; nothing is resubmitted",
             ClusterSpec(trunk_workers=2), ScaleTrunkWorkers),
    Scenario("kill-controller", "kill the controller actor; Ray restarts it and it recovers its state",
             ClusterSpec(), KillController, own_controller=True),
    Scenario("kill-controller-mid-restart", "kill a group, then the controller while it restarts the group",
             ClusterSpec(), KillControllerMidRestart, own_controller=True),
    Scenario("slow-transport", "every send to the expert groups takes 50 ms longer for a while",
             ClusterSpec(slow_transport=True), lambda: SlowTransport(delay_s=0.05, hold_requests=4)),
    Scenario("drain-during-burst", "add a replica, send a burst, and drain the old replica meanwhile",
             ClusterSpec(), lambda: DrainDuringBurst(burst=16)),
)}


def resolve(names: list[str]) -> list[Scenario]:
    """The scenarios named (`all` for every one), in the order given; unknown names raise ValueError."""
    if names == ["all"]:
        return list(SCENARIOS.values())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)} or 'all'")
    return [SCENARIOS[n] for n in names]
