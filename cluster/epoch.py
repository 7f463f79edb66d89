"""How a dispatcher follows the controller's serving set from epoch to epoch.

`ControllerSource` keeps one long-poll (`controller.watch`) open from a small watcher thread. The
poll carries the epoch the dispatcher has *adopted*, which is the acknowledgement the controller
waits for before it drains a replica that left the set; a new set comes back as soon as the epoch
moves. Failures go the other way: `report` (fire and forget) and `repair` (wait, bounded, for the
controller to restore replicas and return the set that has them).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, TaskCancelledError

from .placement import ServingSet

log = logging.getLogger(__name__)


class ControllerSource:
    """A dispatcher's view of the controller (a Ray actor handle); see the module docstring."""

    def __init__(self, controller, *, dispatcher_id: str | None = None, watch_timeout_s: float = 10.0,
                 connect_timeout_s: float = 60.0):
        self.controller = controller
        self.dispatcher_id = dispatcher_id or f"dispatcher-{uuid.uuid4().hex[:8]}"
        self.watch_timeout_s = watch_timeout_s
        self._current: ServingSet = ray.get(controller.snapshot.remote(), timeout=connect_timeout_s)
        self._acked = self._current.epoch
        # Registered from here on, routing with the snapshot's epoch, not from the watch thread's first poll: a
        # drain between the two would not wait for this dispatcher. (A newer set reaches it by that first poll.)
        ray.get(controller.watch.remote(self.dispatcher_id, self._acked, 0.0), timeout=connect_timeout_s)
        self._callback: Callable[[ServingSet], None] | None = None
        self._cond = threading.Condition()
        self._stopped = False
        self._ref: ray.ObjectRef | None = None
        self._thread: threading.Thread | None = None

    def current(self) -> ServingSet:
        return self._current

    def subscribe(self, callback: Callable[[ServingSet], None]) -> None:
        self._callback = callback
        self._thread = threading.Thread(target=self._watch_loop, name=f"{self.dispatcher_id}-watch", daemon=True)
        self._thread.start()

    def ack(self, epoch: int) -> None:
        with self._cond:
            if epoch > self._acked:
                self._acked = epoch
                self._cond.notify_all()

    def _watch_loop(self) -> None:
        delivered = self._acked
        while True:
            with self._cond:
                # Poll again only once the last set delivered has been adopted (or superseded).
                self._cond.wait_for(lambda: self._stopped or self._acked >= delivered)
                if self._stopped:
                    return
                acked = self._acked
                self._ref = self.controller.watch.remote(self.dispatcher_id, acked, self.watch_timeout_s)
            try:
                serving = ray.get(self._ref)
            except TaskCancelledError:
                return
            except RayActorError:
                # The controller is restarting (it recovers its state); poll again once it is back.
                log.warning("controller unreachable; the dispatcher keeps epoch %d meanwhile", acked)
                with self._cond:
                    if self._cond.wait_for(lambda: self._stopped, timeout=1.0):
                        return
                continue
            if serving is None or serving.epoch <= acked:
                continue
            self._current = serving
            delivered = serving.epoch
            if self._callback is not None:
                self._callback(serving)

    def report(self, failures: dict[str, tuple[int, str]]) -> None:
        self.controller.report_failures.remote(failures)

    def repair(self, failures: dict[str, tuple[int, str]], timeout_s: float) -> ServingSet:
        """The controller's serving set once it has dealt with `failures` (bounded by `timeout_s`)."""
        try:
            serving = ray.get(self.controller.repair.remote(failures, timeout_s), timeout=timeout_s + 5.0)
        except (GetTimeoutError, RayActorError) as exc:
            log.error("repair of %s got no answer in %.1fs: %s", sorted(failures), timeout_s, exc)
            return self._current
        if serving.epoch > self._current.epoch:
            self._current = serving
        return serving

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            ref = self._ref
        if ref is not None:
            try:
                ray.cancel(ref)
            except Exception:  # the poll may have finished already
                pass
        try:
            self.controller.forget_dispatcher.remote(self.dispatcher_id)
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(timeout=self.watch_timeout_s + 5.0)
