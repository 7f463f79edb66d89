"""The trunk worker process: an AsyncEngine in a Ray actor, whose outputs and errors the edge polls.

`router/trunk.py` is the edge's side (restarts and resubmission). Errors cross the process
boundary as small records, rebuilt on the edge as the errors the gRPC edge maps to status codes.
"""

from __future__ import annotations

import asyncio
import os
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


# -- the worker process -----------------------------------------------------------------------------------

@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class TrunkWorker:
    """An AsyncEngine in a Ray actor; outputs and errors queue in an outbox the edge polls."""

    def __init__(self, config: EngineConfig, torch_threads: int | None = None):
        import torch

        from .engine import AsyncEngine

        if torch_threads:
            torch.set_num_threads(torch_threads)  # the same BLAS threads as the edge keep results bitwise equal
        self.engine = AsyncEngine.from_config(config)
        self.outbox: list[tuple[str, object]] = []
        self.tasks: dict[str, asyncio.Task] = {}
        self.changed = asyncio.Event()

    async def start(self) -> dict:
        await self.engine.start()
        return {"max_model_len": self.engine.max_model_len, "pid": os.getpid()}

    def _emit(self, request_id: str, item: object) -> None:
        self.outbox.append((request_id, item))
        self.changed.set()

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        try:
            stream = self.engine.generate(request_id, prompt_token_ids, params)
        except Exception as exc:  # noqa: BLE001 - every admission error goes back to its request
            self._emit(request_id, error_record(exc))
            return
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
        self.engine.abort(request_id)

    async def poll(self, timeout_s: float) -> tuple[list[tuple[str, object]], dict]:
        """Everything emitted since the last poll (waits up to `timeout_s` for something), and stats."""
        if not self.outbox:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout_s)
            except TimeoutError:
                pass
        items, self.outbox = self.outbox, []
        self.changed.clear()
        return items, self.engine.stats()

    async def shutdown(self, grace_s: float) -> None:
        await self.engine.shutdown(grace_s)
