"""The trunk worker process: an AsyncEngine in a Ray actor, whose outputs and errors the edge polls.

`router/trunk.py` is the edge's side (restarts and resubmission). Errors cross the process
boundary as small records, rebuilt on the edge as the errors the gRPC edge maps to status codes.
What the engine and its expert dispatcher report to telemetry (step times, queue waits, tokens per
expert, scaling events) is buffered here by a `TelemetryRelay` and travels with the same poll; the
edge replays it into its own Telemetry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

import ray

from .config import EngineConfig
from .errors import EngineStoppedError, ExpertsUnavailableError, InvalidRequestError, QueueFullError, StepFailedError
from .sequence import RequestOutput, SamplingParams


# -- errors across the process boundary --------------------------------------------------------------

def error_record(exc: BaseException) -> tuple[str, str, object]:
    """A picklable (kind, message, detail) for an error met in the worker; `error_from` rebuilds it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ExpertsUnavailableError):  # a step failed because experts were lost
        exc = cause
    if isinstance(exc, InvalidRequestError):
        return "invalid", str(exc).removeprefix(f"{exc.field}: "), exc.field
    if isinstance(exc, QueueFullError):
        return "queue_full", str(exc), None
    if isinstance(exc, EngineStoppedError):
        return "stopped", str(exc), None
    if isinstance(exc, ExpertsUnavailableError):
        return "experts", str(exc), exc.experts
    if isinstance(exc, StepFailedError):  # any other failed step: the request may be retried
        return "step_failed", repr(exc.cause), None
    return "internal", repr(exc), None


def error_from(record: tuple[str, str, object]) -> BaseException:
    kind, message, detail = record
    if kind == "invalid":
        return InvalidRequestError(str(detail), message)
    if kind == "queue_full":
        return QueueFullError(message)
    if kind == "stopped":
        return EngineStoppedError(message)
    if kind == "experts":
        return ExpertsUnavailableError(list(detail), message)
    if kind == "step_failed":  # the cause's text is for the edge's log, not the client (router/status_codes.py)
        return StepFailedError([], RuntimeError(f"trunk worker: {message}"))
    return RuntimeError(f"trunk worker: {message}")


# -- telemetry across the process boundary ----------------------------------------------------------

STEP, QUEUE_WAIT, EXPERT_TOKENS, SCALING_EVENTS = "step", "queue_wait", "expert_tokens", "scaling_events"
RELAY_LIMIT = 50_000  # samples, and counter series, a relay holds between two polls


class _RelayCounter:
    """Stands in for one Telemetry counter (expert_tokens, scaling_events): `add(value, attributes)`."""

    def __init__(self, relay: "TelemetryRelay", name: str):
        self._relay, self._name = relay, name

    def add(self, amount: int | float, attributes: dict | None = None) -> None:
        self._relay._add(self._name, amount, attributes)


class TelemetryRelay:
    """The edge's Telemetry as the worker's engine and expert dispatcher see it; `drain` hands over what came.

    record_step and record_queue_wait (the engine's step thread) keep every sample, the oldest
    dropped past `limit` samples; counter adds (the dispatcher's expert_tokens and scaling_events)
    are summed per attribute set, so they lose nothing, and a new attribute set past `limit` series is
    dropped. Everything dropped is counted. Thread-safe: the step thread records, the actor's loop drains.
    """

    def __init__(self, limit: int = RELAY_LIMIT):
        if limit < 1:
            raise ValueError(f"TelemetryRelay.limit must be >= 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._samples: deque[tuple] = deque()
        self._counters: dict[tuple, float] = {}  # (instrument, sorted attribute items) -> sum since the last drain
        self._dropped = 0
        self.expert_tokens = _RelayCounter(self, EXPERT_TOKENS)
        self.scaling_events = _RelayCounter(self, SCALING_EVENTS)

    def record_step(self, seconds: float, num_tokens: int) -> None:
        self._sample((STEP, float(seconds), int(num_tokens)))

    def record_queue_wait(self, seconds: float) -> None:
        self._sample((QUEUE_WAIT, float(seconds)))

    def _sample(self, record: tuple) -> None:
        with self._lock:
            if len(self._samples) >= self.limit:
                self._samples.popleft()
                self._dropped += 1
            self._samples.append(record)

    def _add(self, name: str, amount: int | float, attributes: dict | None) -> None:
        key = (name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (attributes or {}).items())))
        with self._lock:
            if key in self._counters:
                self._counters[key] += amount
            elif len(self._counters) < self.limit:
                self._counters[key] = amount
            else:
                self._dropped += 1

    def drain(self) -> tuple[list[tuple], int]:
        """(records, dropped) since the last drain: plain picklable tuples, samples oldest first, then counters.

        A record is ("step", seconds, num_tokens), ("queue_wait", seconds), or
        ("expert_tokens" | "scaling_events", amount, attributes dict); `dropped` counts samples and
        counter series left out to keep within `limit`.
        """
        with self._lock:
            samples, self._samples = self._samples, deque()
            counters, self._counters = self._counters, {}
            dropped, self._dropped = self._dropped, 0
        records = list(samples)
        records += [(name, amount, dict(attrs)) for (name, attrs), amount in counters.items()]
        return records, dropped


# -- the worker process -----------------------------------------------------------------------------------

@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class TrunkWorker:
    """An AsyncEngine in a Ray actor; outputs and errors queue in an outbox the edge polls."""

    def __init__(self, config: EngineConfig, torch_threads: int | None = None):
        import torch

        from moeserve.models.demo import local_model_path

        if torch_threads:
            torch.set_num_threads(torch_threads)  # the same BLAS threads as the edge keep results bitwise equal
        if config.model is not None:  # the edge's demo checkpoint is not on this node: this node's stands in
            config = dataclasses.replace(config, model=local_model_path(config.model))
        self.config = config
        self.engine = None  # built by start()
        self.relay = TelemetryRelay()
        self.outbox: list[tuple[str, object]] = []
        self.tasks: dict[str, asyncio.Task] = {}
        self.preparing: set[str] = set()  # submitted, being prepared (LLMEngine.prepare) before generate
        self.changed = asyncio.Event()
        self._delay_s = 0.0  # inject_delay's, read by the step thread before each step

    async def start(self) -> dict:
        """Load the model and start the engine. The load runs on a thread: it may wait on Ray (the expert
        dispatcher asks the controller for the serving set), which must not block this actor's loop."""
        from .engine import AsyncEngine

        if self.engine is None:
            self.engine = await asyncio.to_thread(AsyncEngine.from_config, self.config)
            self.engine.observe(self.relay)  # the engine's figures and its expert dispatcher's
        await self.engine.start()
        # Where its expert dispatcher is registered, (controller, dispatcher id) or None: the edge tells the
        # controller it is gone when this worker dies (a killed worker cannot), so no drain waits for it.
        source = getattr(self.engine.experts_backend, "source", None)
        dispatcher = (source.controller, source.dispatcher_id) if hasattr(source, "dispatcher_id") else None
        return {"max_model_len": self.engine.max_model_len, "pid": os.getpid(), "dispatcher": dispatcher}

    def _emit(self, request_id: str, item: object) -> None:
        self.outbox.append((request_id, item))
        self.changed.set()

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     resume: list[int] = ()) -> None:
        self.preparing.add(request_id)
        try:
            await self.engine.prepare(params)  # (a structured output compiles on a thread meanwhile)
            if request_id not in self.preparing:
                return  # aborted meanwhile
            stream = self.engine.generate(request_id, prompt_token_ids, params, resume=resume)
        except Exception as exc:  # noqa: BLE001 - every admission error goes back to its request
            self._emit(request_id, error_record(exc))
            return
        finally:
            self.preparing.discard(request_id)
        self.tasks[request_id] = asyncio.get_running_loop().create_task(self._pump(request_id, stream))

    async def _pump(self, request_id: str, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                self._emit(request_id, out)
        except Exception as exc:  # noqa: BLE001 - a failed step ends its requests, not the worker
            self._emit(request_id, error_record(exc))
        finally:
            self.tasks.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.preparing.discard(request_id)
        self.engine.abort(request_id)

    async def inject_delay(self, seconds: float) -> None:
        """Fault injection for the chaos suite (the expert group's `inject_delay`, for the trunk): from now
        on every engine step first sleeps `seconds` on the step thread (0 = off).

        The actor's event loop is not held, so polls, submits and aborts still answer: the worker looks
        alive and only its `steps` counter stops, which is what the edge's stall detection watches.
        """
        self._delay_s = max(0.0, float(seconds))
        core = self.engine.core
        if "step" in vars(core):  # wrapped already
            return
        step = core.step

        def delayed_step(ready=None):
            delay = self._delay_s
            if delay > 0:
                if ready is not None:  # as a step stalled in its forward would have: the last outputs are out
                    ready()
                time.sleep(delay)
            return step(ready)

        core.step = delayed_step  # the step thread looks it up before every step

    async def poll(self, timeout_s: float) -> dict:
        """Everything emitted since the last poll (waits up to `timeout_s` for an output), with stats and telemetry.

        {"items": [(request_id, RequestOutput | error record)], "stats": the engine's stats(),
         "telemetry": TelemetryRelay records, "telemetry_dropped": records the relay left out}.
        Telemetry drained after the items covers at least the steps that made them.
        """
        if not self.outbox:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout_s)
            except TimeoutError:
                pass
        items, self.outbox = self.outbox, []
        self.changed.clear()
        records, dropped = self.relay.drain()
        return {"items": items, "stats": self.engine.stats(), "telemetry": records, "telemetry_dropped": dropped}

    async def shutdown(self, grace_s: float) -> None:
        if self.engine is None:  # never started
            return
        await self.engine.shutdown(grace_s)
        # Its expert dispatcher leaves the controller now, so no drain of an expert replica waits for
        # this worker's epoch acknowledgement (dispatcher_ttl_s) once it is gone.
        backend = self.engine.experts_backend
        if backend is not None and hasattr(backend, "close"):
            await asyncio.to_thread(backend.close)
