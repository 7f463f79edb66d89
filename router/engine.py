"""AsyncEngine: the engine as the asyncio gRPC edge sees it.

Steps run on one dedicated thread (torch releases the GIL, so the event loop keeps serving); each
step's outputs go to the loop in one `call_soon_threadsafe` and from there to per-request queues.
Admission errors (QueueFullError, EngineStoppedError, InvalidRequestError) are raised at call time.
A consumer that stops iterating, or a deadline that passes, aborts the request and frees its KV
blocks at once (the core's lock, not the step, guards the bookkeeping).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

from .config import EngineConfig
from .errors import EngineStoppedError, InvalidRequestError
from .llm_engine import LLMEngine, StepFailedError
from .sequence import RequestOutput, SamplingParams

__all__ = ["AsyncEngine", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams", "StepFailedError"]

_Item = RequestOutput | BaseException
SWITCH_INTERVAL_S = 0.001  # the interpreter's GIL switch interval while an AsyncEngine runs (process-wide)
# A burst of requests is still arriving while one came within this long. Sixteen clients sending at once reach
# the engine some 0.3 ms apart on an H100 host, with an occasional gap of more than 1 ms (the GIL, gRPC's
# poller): at 1 ms a burst of 16 Qwen3-30B-A3B prompts was cut into steps of 6 and 10 (docs/benchmarks.md).
ARRIVAL_GAP_S = 0.002


class AsyncEngine:
    """Serves many concurrent `generate` streams from one LLMEngine."""

    def __init__(self, core: LLMEngine):
        self.core = core
        self.config = core.config
        self.model_config = core.model_config
        self.tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.dtype = core.dtype
        self._queues: dict[str, asyncio.Queue[_Item]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._work = threading.Condition()  # the step thread waits here while there is nothing to do
        self._pending: list[RequestOutput] = []  # the last step's outputs, not yet handed to the loop
        self._exit = False
        self._stopping = False
        self._failure: BaseException | None = None
        self._drained: asyncio.Event | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        """Load the model and tokenizer the config names and build the engine (not started)."""
        return cls(LLMEngine.from_config(config))

    async def start(self) -> None:
        if self._thread is not None:
            return
        if self._stopping:
            raise EngineStoppedError("the engine was shut down; build a new one")
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        # The step thread and the event loop's thread share the GIL; at the default 5 ms switch
        # interval a step ready to launch can wait that long behind the loop streaming tokens.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, name="moeserve-engine-step", daemon=True)
        self._thread.start()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop admitting; let in-flight requests finish within grace_s, end the rest as "cancelled"."""
        self._stopping = True
        if self._thread is None:
            return
        if self.core.has_unfinished() and grace_s > 0:
            try:
                await asyncio.wait_for(self._drained.wait(), grace_s)
            except TimeoutError:
                pass
        for request_id in list(self.core.requests):
            self.abort(request_id)
        with self._work:
            self._exit = True
            self._work.notify()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join)

    # -- requests ---------------------------------------------------------------------------------
    async def prepare(self, params: SamplingParams) -> None:
        """LLMEngine.prepare on a thread: a structured output compiles (tens of milliseconds to seconds for a large
        schema, or a tokenizer's first) while the event loop goes on streaming; generate() then finds it compiled."""
        if params.structured_output is not None:
            await asyncio.to_thread(self.core.prepare, params)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 deadline: float | None = None, resume: list[int] = ()) -> AsyncIterator[RequestOutput]:
        """Queue a request and stream its outputs; the last has finished=True. Raises at call time. `resume`: see
        LLMEngine.add_request."""
        if self._failure is not None:
            raise EngineStoppedError(f"the engine failed and takes no new work: {self._failure!r}")
        if self._stopping or self._thread is None:
            raise EngineStoppedError("the engine is not running (not started, or shutting down)")
        if request_id in self._queues:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight; use a unique id")
        self.core.add_request(request_id, list(prompt_token_ids), params, deadline, resume=resume)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queues[request_id] = queue
        with self._work:
            self._work.notify()
        return RequestStream(self, request_id, queue, deadline)

    def _release(self, request_id: str, finished: bool) -> None:
        """A stream is done with its request: drop its queue and, unless it finished, abort it."""
        self._queues.pop(request_id, None)
        if not finished:
            self.core.abort(request_id)
        self._check_drained()

    def abort(self, request_id: str) -> None:
        """End a request now; its stream gets a final "cancelled" output. No-op if it is not in flight."""
        out = self.core.abort(request_id)
        queue = self._queues.get(request_id)
        if out is not None and queue is not None:
            queue.put_nowait(out)
        self._check_drained()

    def stats(self) -> dict:
        return self.core.stats()

    @property
    def experts_backend(self) -> Any:
        """The routed-expert backend of the model in this engine (an ExpertDispatcher), or None."""
        return getattr(self.core.model, "experts_backend", None)

    def observe(self, observer: Any) -> None:
        """Report step times and queue waits to `observer` (cluster.telemetry.Telemetry, or the trunk
        worker's relay); an expert dispatcher serving the model (its `telemetry` slot still free) reports
        per-expert token load and scaling events there too."""
        self.core.observer = observer
        backend = self.experts_backend
        if backend is not None and hasattr(backend, "telemetry") and backend.telemetry is None:
            backend.telemetry = observer

    # -- the step thread and its deliveries -------------------------------------------------------
    def _run(self) -> None:
        """The step loop. A step's outputs reach the event loop at the next step's `ready` point (see
        ModelRunner.run): after a decode graph is queued, the loop streams them while this thread waits
        for the GPU without the GIL, rather than both threads contending while the step launches. Before
        this thread waits for work, or when the next step fails or never runs, they are handed over at once."""
        core = self.core
        while True:
            with self._work:
                if not core.has_unfinished():
                    self._flush()
                while not self._exit and not core.has_unfinished():
                    self._work.wait()
                self._wait_for_burst()
                if self._exit:
                    self._flush()
                    return
            try:
                outputs = core.step(self._flush)
            except StepFailedError as exc:
                self._flush()
                self._post(self._fail, exc.request_ids, exc)
                continue
            except BaseException as exc:  # a bug in the engine itself: end every request with it
                self._flush()
                self._post(self._die, exc)
                return
            self._flush()  # the step ran nothing (ready not called)
            self._pending = outputs

    def _flush(self) -> None:
        """Hand the outputs held back from the last step to the event loop."""
        outputs, self._pending = self._pending, []
        if outputs:
            self._post(self._dispatch, outputs)

    def _wait_for_burst(self) -> None:
        """Hold the next step while a burst of requests is still arriving (called holding _work).

        Clients that send at once reach the engine spread over a few milliseconds: the event loop takes
        each call in turn. A step started at the first arrival prefills it alone, and the rest wait for
        that whole step (tens of milliseconds eager on a GPU) before theirs; one step for the burst costs
        little more than one for a single prompt. So while requests keep arriving (the last within
        ARRIVAL_GAP_S) and the next step could still take another, the step waits, never longer than
        config.batch_wait_ms after the first of them: a lone request waits ARRIVAL_GAP_S, a backlog
        (its oldest request waiting longer than that already) not at all."""
        limit = self.config.batch_wait_ms / 1e3
        while limit > 0 and not self._exit:
            span = self.core.admissible_arrivals()
            if span is None:
                return
            now = time.monotonic()
            until = min(span[1] + ARRIVAL_GAP_S, span[0] + limit)
            if until <= now:
                return
            self._flush()
            self._work.wait(until - now)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is left to deliver to
            pass

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        self._check_drained()

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        for request_id in request_ids:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(exc)
        self._check_drained()

    def _die(self, exc: BaseException) -> None:
        self._failure = exc
        for request_id in list(self.core.requests):
            self.core.abort(request_id)
        for queue in self._queues.values():
            queue.put_nowait(EngineStoppedError(f"the engine failed: {exc!r}"))
        self._check_drained()

    def _check_drained(self) -> None:
        if self._stopping and self._drained is not None and not self.core.has_unfinished():
            self._drained.set()


class RequestStream:
    """One request's outputs, as an async iterator; closing it, or cancelling its consumer, aborts it.

    A class rather than an async generator so that `aclose()` aborts even a stream never iterated.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue[_Item], deadline: float | None):
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._deadline = deadline
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await _next(self._queue, self._deadline)
            if item is None:  # the deadline passed
                item = self._engine.core.abort(self.request_id)
                if item is None:  # it ended meanwhile; its last output is on the way
                    self._deadline = None
                    item = await self._queue.get()
        except BaseException:  # the consumer was cancelled
            self._close(finished=False)
            raise
        if isinstance(item, BaseException):
            self._close(finished=False)
            raise item
        if item.finished:
            self._close(finished=True)
        return item

    async def aclose(self) -> None:
        self._close(finished=False)

    def _close(self, finished: bool) -> None:
        if not self._done:
            self._done = True
            self._engine._release(self.request_id, finished)


async def _next(queue: asyncio.Queue[_Item], deadline: float | None) -> _Item | None:
    """The next item, or None once the deadline (time.monotonic()) has passed."""
    if not queue.empty() or deadline is None:
        return await queue.get()
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    try:
        return await asyncio.wait_for(queue.get(), remaining)
    except TimeoutError:
        return None
