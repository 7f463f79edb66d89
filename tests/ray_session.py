"""One local Ray (2 CPUs, no custom resources) lent to the test modules that need a plain one, module after module.

Starting a Ray takes ~5 s of the machine's two cores and shutting it down ~1.5 s, once per module; the modules
that borrow this one (the `shared_ray` fixture, tests/conftest.py) pay it once between them. A module is lent it
only as a fresh one: once a module is done, every actor must be dead (kills are asynchronous: waited for up to
SETTLE_S), every resource free, no placement group left and no controller state in the KV store. A module that
leaves anything is not followed by its leftovers: the Ray is shut down and the next borrower starts a new one.

Modules that need a Ray of their own (custom resources, a head of their own, one they shut down themselves) keep
calling ray.init; tests/conftest.py runs them before the borrowers, so no lent Ray is up when they do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

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
