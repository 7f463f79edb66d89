"""One local Ray (2 CPUs, no custom resources) lent to the test modules that need a plain one, module after module.

Starting a Ray takes ~5 s of the machine's two cores and shutting it down ~1.5 s, once per module; the modules
that borrow this one (the `shared_ray` fixture, tests/conftest.py) pay it once between them. A module is lent it
only as a fresh one: once a module is done, every actor must be dead (kills are asynchronous: waited for up to
SETTLE_S), every resource free, no placement group left and no controller state in the KV store. A module that
leaves anything is not followed by its leftovers: the Ray is shut down and the next borrower starts a new one.

Modules that need a Ray of their own (custom resources, a head of their own, one they shut down themselves) keep
calling ray.init; tests/conftest.py runs them before the borrowers, so no lent Ray is up when they do.

Under pytest-xdist (`make test` runs two workers) the modules that start a Ray, listed in RAY_MODULES, make two
chains (`xdist_scheduler`), each one unit of work that runs in collection order on one worker, as without xdist:
the first has every module with a Ray of its own and some borrowers, the second (SECOND_CHAIN) only borrowers,
lent a Ray of their worker's own; the modules of OWN_PORTS (a Ray on free ports they pick) are units of their
own. So two Rays may be up at once, one per worker: in a worker every local Ray's dashboard agent listens on a free
port (`free_agent_port`), not on Ray's fixed 52365. A module with a Ray of its own that a worker gets after
borrowing shuts the lent Ray down first (`no_lent_ray`). A test outside RAY_MODULES that starts a Ray fails at once
(`guard_ray_init`) and says to list its module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

# The test modules that start a Ray (paths under tests/), as the chains they make under xdist. The first chain: the
# modules with a Ray of their own, then test_scenarios (a borrower of the lent Ray, ~275 s alone).
FIRST_CHAIN = (
    "chaos/test_scenarios.py",
    "cluster/test_autoscaling_stop.py",  # its own, shut down inside the test
    "cluster/test_controller.py",  # its own
    "cluster/test_trunk_demand.py",  # its own, with a custom resource
    "experts/test_backend.py",  # its own, with custom resources
)
# The other worker's chain, borrowers only (seconds of a clean-clone run with both workers busy): ~355 s of ~800 s
# of Ray tests.
SECOND_CHAIN = (
    "chaos/test_trunk.py",
    "chaos/test_trunk_pool.py",
    "chaos/test_trunk_telemetry.py",
    "cluster/test_admin.py",
    "cluster/test_autoscaling_lease.py",
    "cluster/test_autoscaling_serve.py",
    "cluster/test_expert_failures.py",
    "cluster/test_live_scaling.py",
    "cluster/test_metrics.py",
    "cluster/test_serving_status.py",
    "cluster/test_trunk_scaling_serve.py",
    "experts/test_gloo_transport.py",
    "experts/test_ray_groups.py",
)
# Those whose Ray takes only free ports (`ray start` with every port given): units of their own, in no chain.
# test_fake_multinode (a `ray start --head` with Ray's fake multi-node autoscaler) waits ~1.5 min on the autoscaler.
OWN_PORTS = ("cluster/test_fake_multinode.py",)
# Every test module that starts a Ray.
RAY_MODULES = FIRST_CHAIN + SECOND_CHAIN + OWN_PORTS
RAY_SCOPE = "ray"
SECOND_SCOPE = "ray-2"
NAMESPACE = "moeserve-tests"
NUM_CPUS = 2
SETTLE_S = 10.0
KV_PREFIX = "moeserve/"  # cluster/controller.py keeps each controller's state under it


class RaySession:
    """Starts the lent Ray on first use, checks it after each module (`release`), shuts it down when not fresh."""

    def __init__(self, temp_dir: Callable[[], Path]):
        self._temp_dir = temp_dir
        self.up = False
        self.starts = 0
        self.lent = 0  # modules
        self.dropped: list[str] = []  # why it was shut down after a module

    def acquire(self) -> None:
        import ray

        if self.up and ray.is_initialized():
            self.lent += 1
            return
        if ray.is_initialized():
            raise RuntimeError("a Ray is initialised in this process already: a test that started its own Ray "
                               "left it running (shut it down at its end)")
        ray.init(num_cpus=NUM_CPUS, _temp_dir=str(self._temp_dir()), include_dashboard=False, namespace=NAMESPACE)
        self.up = True
        self.starts += 1
        self.lent += 1

    def release(self, module: str) -> None:
        """After `module`: keep the Ray for the next borrower if it is as fresh as a new one, else shut it down."""
        import ray

        if not ray.is_initialized():  # the module shut it down itself
            self.up = False
            return
        deadline = time.monotonic() + SETTLE_S
        while (left := leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            self.dropped.append(f"{module} left {'; '.join(left)}")
            self.stop()

    def summary(self) -> str:
        return (f"lent Ray: {self.starts} start(s) for {self.lent} module(s)"
                + "".join(f"\n  shut down after {why}" for why in self.dropped))

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.up = False


def leftovers() -> list[str]:
    """What makes the running Ray differ from a freshly started one (empty: nothing)."""
    import ray
    from ray.experimental import internal_kv

    found = []
    alive = sorted(f"{a['Name'] or a['ActorClassName']}:{a['State']}" for a in ray._private.state.actors().values()
                   if a["State"] != "DEAD")
    if alive:
        found.append(f"actors not dead {alive}")
    total, free = ray.cluster_resources(), ray.available_resources()
    held = {k: v - free.get(k, 0.0) for k, v in total.items()
            if k not in ("memory", "object_store_memory") and abs(v - free.get(k, 0.0)) > 1e-9}
    if held:
        found.append(f"resources held {held}")
    groups = [g for g, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"]
    if groups:
        found.append(f"placement groups {groups}")
    keys = internal_kv._internal_kv_list(KV_PREFIX)
    if keys:
        found.append(f"KV keys {sorted(keys)}")
    return found


def order(items: list) -> None:
    """Borrowers of the lent Ray last, whole modules in their own order: it starts once, and the modules that start
    a Ray of their own run before it is up."""
    borrowers = {item.path for item in items if "shared_ray" in getattr(item, "fixturenames", ())}
    items[:] = [i for i in items if i.path not in borrowers] + [i for i in items if i.path in borrowers]


def _module(nodeid: str) -> str:
    """The module of the test `nodeid` (rootdir-relative, as pytest writes it), as a path under tests/."""
    module = nodeid.split("::", 1)[0]
    return module[len("tests/"):] if module.startswith("tests/") else ""


def starts_ray(nodeid: str) -> bool:
    """Whether the test `nodeid` is in one of RAY_MODULES."""
    return _module(nodeid) in RAY_MODULES


def _chain(nodeid: str) -> str | None:
    """The scope of the Ray chain that the test `nodeid` (or a module path) is in; None: it is in none."""
    module = _module(nodeid)
    if module not in RAY_MODULES or module in OWN_PORTS:
        return None
    return SECOND_SCOPE if module in SECOND_CHAIN else RAY_SCOPE


def xdist_scheduler(config, log):
    """pytest-xdist's loadscope with whole modules as units, and each Ray chain (`_chain`) as one unit. The chains go
    out first (the first worker the first chain, the next worker the second), then the OWN_PORTS modules, then the
    rest, largest first."""
    from xdist.scheduler import LoadScopeScheduling

    def rank(scope: str) -> int:
        return {RAY_SCOPE: 0, SECOND_SCOPE: 1}.get(scope, 2 if _module(scope) in OWN_PORTS else 3)

    class RayScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _chain(nodeid) or nodeid.split("::", 1)[0]

        def _assign_work_unit(self, node) -> None:
            for scope in sorted((s for s in self.workqueue if rank(s) < 3), key=rank, reverse=True):
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return RayScopeScheduling(config, log)


def free_agent_port() -> None:
    """In this process, a local Ray's dashboard agent listens on a free port rather than on Ray's fixed 52365 (which
    ray.init has no argument for): the other worker's Ray may be up meanwhile."""
    import functools
    import socket

    from ray._private.parameter import RayParams

    real = RayParams.__init__

    @functools.wraps(real)
    def init(self, *args, **kwargs):
        if "dashboard_agent_listen_port" not in kwargs:
            with socket.socket() as s:
                s.bind(("", 0))
                kwargs["dashboard_agent_listen_port"] = s.getsockname()[1]
        real(self, *args, **kwargs)

    RayParams.__init__ = init


def guard_ray_init(allowed: Callable[[], bool]) -> None:
    """Make ray.init fail, in this process, when `allowed()` is false (an xdist worker, not in a RAY_MODULES test)."""
    import functools

    import ray

    real = ray.init

    @functools.wraps(real)
    def init(*args, **kwargs):
        if not allowed():
            raise RuntimeError("this test starts a Ray, beside the Ray tests of the other xdist worker: add its "
                               "module to RAY_MODULES in tests/ray_session.py")
        return real(*args, **kwargs)

    ray.init = init
