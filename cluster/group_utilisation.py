"""The `expert_group_utilisation` gauge of a serving process, kept current from the controller.

The expert groups report their busy time to the controller (`ExpertController.status()`), not to the
edge that exports the gauge. `GroupUtilisationPoller` asks the controller every few seconds, sets each
group's busy share (the mean over its serving replicas, as the autoscaler reads it) and forgets the
groups that no longer exist. Serving never waits on it: a controller that is restarting is said once
in the log and asked again, and the gauge keeps its last values meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import ray
from ray.exceptions import GetTimeoutError

from .autoscaling.live import group_busy_shares

log = logging.getLogger(__name__)


class GroupUtilisationPoller:
    """Copies the busy share of each expert group of `controller` (an ExpertController actor handle) into
    `telemetry` (cluster.telemetry.Telemetry) every `interval_s`, from a daemon thread."""

    def __init__(self, controller, telemetry, *, interval_s: float = 2.0, timeout_s: float = 10.0):
        for name, value in (("interval_s", interval_s), ("timeout_s", timeout_s)):
            if value <= 0:
                raise ValueError(f"{name}: must be > 0, got {value}")
        self.controller, self.telemetry = controller, telemetry
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._groups: set[str] = set()  # the groups exported now
        self._ref: ray.ObjectRef | None = None  # the status call in flight: one at a time, however slow
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, status: Mapping) -> dict[str, float]:
        """Export the busy shares in `status` (ExpertController.status()), forget groups it lacks; the shares."""
        shares = group_busy_shares(status)
        for name in self._groups - shares.keys():
            self.telemetry.forget_group_utilisation(name)
        for name, share in shares.items():
            self.telemetry.set_group_utilisation(name, share)
        self._groups = set(shares)
        return shares

    def poll(self) -> dict[str, float]:
        """Ask the controller (waiting at most timeout_s) and export its answer; the shares."""
        if self._ref is None:
            self._ref = self.controller.status.remote()
        try:
            status = ray.get(self._ref, timeout=self.timeout_s)
        except GetTimeoutError:
            raise  # still in flight (a restarting controller answers it once back): the next poll waits on it
        except BaseException:
            self._ref = None
            raise
        self._ref = None
        return self.update(status)

    def run(self) -> None:
        """Poll every interval_s until `stop()` (or until Ray is shut down under it)."""
        while not self._stop.is_set() and ray.is_initialized():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the gauge waits for the controller; serving does not
                if not self._failing and not self._stop.is_set():
                    log.warning("expert group utilisation: no answer from the controller (%s: %s); asking again "
                                "every %gs", type(exc).__name__, exc, self.interval_s)
                self._failing = True
            else:
                if self._failing:
                    log.info("expert group utilisation: the controller answers again")
                self._failing = False
            self._stop.wait(self.interval_s)  # the polling period, not a synchronisation

    def start(self) -> GroupUtilisationPoller:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="moeserve-group-utilisation", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling; returns once the thread is done (a status call in flight is cancelled)."""
        self._stop.set()
        ref = self._ref
        if ref is not None and ray.is_initialized():
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - it may have finished already
                pass
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5.0)
            self._thread = None
