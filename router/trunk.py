"""The trunk worker, edge side: the engine (model trunk, KV cache, scheduler) runs in its own process.

`TrunkEngine` has the `AsyncEngine` interface (generate / abort / stats / start / shutdown), so the
gRPC server serves either; the engine itself runs in a `TrunkWorker` actor (router/trunk_worker.py)
whose outputs come back over one long poll. When the worker dies, the edge starts a new one and
resubmits every request in flight with its prompt plus the tokens already streamed (a recompute, as
after a preemption), so the client sees no error and, under greedy sampling, the same tokens. A
seeded sampled request restarts its generator there. The dead worker's expert dispatcher cannot leave
the controller itself, so the edge has the controller forget it at once: no drain of an expert replica
waits for its epoch acknowledgement.

A worker that hangs without dying is caught by its progress: its step thread can be stuck while its
actor's event loop still answers polls, so the edge watches the `steps` counter each poll reports.
When the worker holds requests of the edge's and `steps` has not moved for longer than
`stall_timeout_s`, the edge logs it, counts it (`stalls`, `trunk_stalls` in stats) and kills the
actor; the next poll fails and the restart above takes over. An idle worker is never taken for
stalled: the clock starts again whenever the worker goes from idle to holding a request, and after
every restart. The timeout must exceed the longest step the worker can legitimately take (a step
waiting for an expert group to recover can last the dispatcher's recovery_timeout_s per MoE layer);
a worker whose event loop stops answering polls altogether is not detected.

Text and stop strings are decoded on the edge, not in the worker: text the worker held back (a
possible stop string, half a UTF-8 character) would otherwise die with it.

Telemetry: what the worker's engine and expert dispatcher report (step times, queue waits, tokens
per expert, scaling events) comes back with each poll and is replayed on the event loop into the
observer given to `observe` (the edge's Telemetry); with none, it is dropped. `stats()` counters
(`WORKER_COUNTERS`) carry over restarts, so they never go backwards; gauges are the live worker's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .errors import EngineStoppedError, InvalidRequestError
from .sequence import RequestOutput, SamplingParams, check_admission
from .trunk_worker import EXPERT_TOKENS, QUEUE_WAIT, SCALING_EVENTS, STEP, TrunkWorker, error_from

log = logging.getLogger(__name__)

_START_ATTEMPTS = 3  # a worker that fails to start this many times in a row fails the engine
_POLL_S = 5.0  # one long poll; a dead worker ends it at once, so this only bounds idle round trips
_MIN_POLL_S = 0.1  # the shortest long poll a small stall_timeout_s makes (half of it, at most _POLL_S)
# The cumulative figures of the worker's stats() (LLMEngine.stats); the rest of its keys are gauges.
WORKER_COUNTERS = ("steps", "requests_added", "prompt_tokens", "tokens_computed", "tokens_generated",
                   "requests_finished", "preemptions", "busy_us", "prefix_cache_queried_tokens",
                   "prefix_cache_hit_tokens", "draft_tokens", "draft_tokens_accepted")


@dataclass
class _Flight:
    """One request as the edge tracks it across worker restarts."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    detokenizer: IncrementalDetokenizer | None
    arrival: float
    generated: list[int] = field(default_factory=list)
    incarnation: int = -1  # the worker it was last submitted to
    first_token_time: float | None = None
    cached_prompt_tokens: int | None = None  # as the worker that first admitted it found them

    def resubmission(self) -> tuple[list[int], SamplingParams, list[int]]:
        """Prompt, params and the tokens generated so far, which continue this request on a fresh worker as they
        would have gone on (LLMEngine.add_request's `resume`); stop strings stay on the edge."""
        return self.prompt, dataclasses.replace(self.params, stop=()), list(self.generated)


def _forget(dispatcher: tuple[Any, str] | None) -> None:
    """Have the controller forget a worker's expert dispatcher, (controller, dispatcher id); None: there is none."""
    if dispatcher is None:
        return
    controller, dispatcher_id = dispatcher
    try:
        controller.forget_dispatcher.remote(dispatcher_id)  # retried across a controller restart
    except Exception:  # noqa: BLE001 - Ray shut down under us: no controller waits for it either
        log.debug("could not tell the controller that dispatcher %s is gone", dispatcher_id, exc_info=True)


class TrunkEngine:
    """The AsyncEngine interface over a `TrunkWorker`, restarting it and resubmitting on its death."""

    def __init__(self, config: EngineConfig, *, torch_threads: int | None = None, actor_options: dict | None = None,
                 max_restarts: int = 100, start_timeout_s: float = 300.0, stall_timeout_s: float = 300.0):
        from moeserve.models.config import ModelConfig
        from moeserve.models.demo import ensure_demo_model
        from moeserve.models.tokenizer import load_tokenizer

        if not stall_timeout_s > 0:  # NaN too
            raise ValueError(f"stall_timeout_s: must be > 0 (seconds a worker holding requests may go without "
                             f"a step before it is killed and restarted), got {stall_timeout_s!r}")
        if config.model is None:
            config = dataclasses.replace(config, model=str(ensure_demo_model()))
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = load_tokenizer(config.model) if (Path(config.model) / "tokenizer.json").is_file() else None
        self.dtype = config.torch_dtype
        self.max_model_len = 0  # known once the worker has started
        self._eos = frozenset(self.model_config.eos_token_ids)
        self._threads = torch_threads
        self._options = actor_options or {}
        self._max_restarts = max_restarts
        self._start_timeout_s = start_timeout_s
        self._stall_timeout_s = float(stall_timeout_s)
        # Polls come back at least this often, so a stall is seen within about 1.5 x stall_timeout_s.
        self._poll_s = min(_POLL_S, max(_MIN_POLL_S, self._stall_timeout_s / 2))
        self._steps_seen = 0  # the live worker's `steps` at the last poll
        self._step_clock = time.monotonic()  # when it last stepped, or last went from idle to busy
        self._stall_killed = None  # the actor last killed as stalled (killed once; its next poll fails)
        self._flights: dict[str, _Flight] = {}
        self._actor = None
        self._dispatcher = None  # (controller, dispatcher id) of the live worker's expert dispatcher, if it has one
        self._incarnation = 0
        self._ready = asyncio.Event()
        self._progress = asyncio.Condition()  # notified when a request ends or the worker restarts
        self._stats: dict = {}  # the live worker's last stats()
        self._carried = dict.fromkeys(WORKER_COUNTERS, 0)  # counters of the workers that died
        self._observer = None
        self.telemetry_dropped = 0  # telemetry records the workers left out (their relay's bound)
        self._pump_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._failure: BaseException | None = None
        self.restarts = 0
        self.resubmitted = 0  # requests carried over to a restarted worker, in all
        self.stalls = 0  # workers killed for holding requests without a step for stall_timeout_s

    @property
    def worker(self):
        """The current TrunkWorker actor handle (the chaos suite kills it)."""
        return self._actor

    # -- lifecycle --------------------------------------------------------------------------------
    async def _spawn(self):
        import torch

        from moeserve.experts.backend import RayExpertBackend

        threads = self._threads or torch.get_num_threads()
        config, named = self.config, None
        backend = config.expert_backend
        if isinstance(backend, RayExpertBackend):
            # Its expert dispatcher's name is picked here, so that the controller can be told to forget it even
            # if the worker dies after registering it and before start() returns it.
            named = (backend.controller, f"trunk-{uuid.uuid4().hex[:12]}")
            config = dataclasses.replace(config, expert_backend=dataclasses.replace(backend, dispatcher_id=named[1]))
        actor = TrunkWorker.options(**self._options).remote(config, threads)
        try:
            info = await asyncio.wait_for(actor.start.remote(), self._start_timeout_s)
        except BaseException:
            ray.kill(actor, no_restart=True)
            _forget(named)
            raise
        self.max_model_len = info["max_model_len"]
        self._dispatcher = info.get("dispatcher")
        return actor

    async def start(self) -> None:
        if self._actor is not None:
            return
        if self._stopping:
            raise EngineStoppedError("the engine was shut down; build a new one")
        self._actor = await self._spawn()
        self._incarnation = 1
        self._step_clock = time.monotonic()
        self._ready.set()
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop admitting; let in-flight requests finish within grace_s, end the rest as "cancelled"."""
        self._stopping = True
        if self._actor is None:
            return
        if self._flights and grace_s > 0:
            try:
                async with self._progress:
                    await asyncio.wait_for(self._progress.wait_for(lambda: not self._flights), grace_s)
            except TimeoutError:
                pass
        for request_id in list(self._flights):
            self.abort(request_id)
        actor, self._actor = self._actor, None
        self._ready.clear()
        if self._pump_task is not None:
            self._pump_task.cancel()
        try:
            await asyncio.wait_for(actor.shutdown.remote(0), 30.0)
        except Exception:  # noqa: BLE001 - it may be dead already; it is killed next either way
            pass
        ray.kill(actor, no_restart=True)
        self._forget_dispatcher()  # its own shutdown did, unless it was dead or hung

    @property
    def in_flight(self):
        """Ids of the requests this engine holds now (a read-only view)."""
        return self._flights.keys()

    async def wait_idle(self) -> None:
        """Return once no request is in flight (or the worker cannot be restarted); new ones may still come."""
        async with self._progress:
            await self._progress.wait_for(lambda: not self._flights or self._failure is not None)

    async def wait_restarts(self, count: int) -> None:
        """Return once the worker has been restarted `count` times in all (the chaos suite waits on it)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.restarts >= count or self._failure is not None)

    # -- requests ---------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and stream its outputs; the last has finished=True. Raises at call time."""
        if self._failure is not None:
            raise EngineStoppedError(f"the trunk worker cannot be restarted: {self._failure!r}")
        if self._stopping or self._actor is None:
            raise EngineStoppedError("the engine is not running (not started, or shutting down)")
        if request_id in self._flights:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight; use a unique id")
        prompt = list(prompt_token_ids)
        self._validate(prompt, params)
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.stop, params.include_stop_str_in_output) \
            if self.tokenizer is not None else None
        flight = _Flight(request_id, prompt, params, asyncio.Queue(), detok, time.monotonic())
        self._flights[request_id] = flight
        if self._ready.is_set():
            self._submit(flight)
        else:  # a restart is under way: the new worker takes it
            self._background(self._submit_when_ready(flight))
        return _TrunkStream(self, flight, deadline)

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        # What LLMEngine checks at admission, so errors still come at call time.
        check_admission(prompt, params, self.model_config.vocab_size, self.max_model_len, self.tokenizer is not None)

    async def _submit_when_ready(self, flight: _Flight) -> None:
        await self._ready.wait()
        if self._flights.get(flight.request_id) is flight and flight.incarnation < 0:
            self._submit(flight)

    def _submit(self, flight: _Flight) -> None:
        # No await between reading the worker and sending to it: a restart cannot slip in between.
        if not self._held():  # an idle worker's stall clock starts with its first request
            self._step_clock = time.monotonic()
        flight.incarnation = self._incarnation
        prompt, params, resume = flight.resubmission()
        self._actor.submit.remote(flight.request_id, prompt, params, resume)  # errors come back through the poll

    def abort(self, request_id: str) -> None:
        """End a request now; its stream gets a final "cancelled" output. No-op if it is not in flight."""
        flight = self._flights.pop(request_id, None)
        if flight is None:
            return
        if self._actor is not None:
            self._actor.abort.remote(request_id)
        flight.queue.put_nowait(self._output(flight, [], "", "cancelled"))
        self._changed()

    def _release(self, request_id: str, finished: bool) -> None:
        if not finished:
            self.abort(request_id)

    def stats(self) -> dict:
        """The live worker's gauges; counters summed over every worker so far (monotonic across restarts)."""
        out = dict(self._stats)
        for key in WORKER_COUNTERS:
            out[key] = self._carried[key] + int(self._stats.get(key, 0))
        out.update(trunk_restarts=self.restarts, trunk_stalls=self.stalls, requests_in_flight=len(self._flights))
        return out

    def observe(self, observer: Any) -> None:
        """Report the worker's step times and queue waits (record_step, record_queue_wait) and, where
        `observer` has them, its experts' expert_tokens and scaling_events to `observer`
        (cluster.telemetry.Telemetry), on the event loop; None stops it. Records that arrive while no
        observer is attached are dropped."""
        self._observer = observer

    # -- the poll loop and restarts ------------------------------------------------------------------
    async def _pump(self) -> None:
        while True:
            actor = self._actor
            try:
                polled = await actor.poll.remote(self._poll_s)
            except RayActorError as exc:
                if self._stopping:
                    return
                await self._restart(actor, exc)
                if self._failure is not None:
                    return
                continue
            if actor is not self._actor:  # shut down meanwhile
                return
            self._stats = polled["stats"]
            self._replay(polled["telemetry"], polled["telemetry_dropped"])
            for request_id, item in polled["items"]:
                flight = self._flights.get(request_id)
                if flight is not None:
                    self._deliver(flight, item)
            self._check_stall(actor)

    def _held(self) -> int:
        """Requests of the edge's given to the live worker that have not ended."""
        return sum(1 for f in self._flights.values() if f.incarnation == self._incarnation)

    def _check_stall(self, actor) -> None:
        """After every poll (empty ones too): kill `actor` if it holds requests and has not stepped for
        longer than stall_timeout_s; the next poll then fails and `_restart` resubmits its requests."""
        now = time.monotonic()
        steps = int(self._stats.get("steps", 0))
        if steps != self._steps_seen:
            self._steps_seen, self._step_clock = steps, now
            return
        held = self._held()
        if not held:  # idle: nothing to step for
            self._step_clock = now
            return
        still = now - self._step_clock
        if still <= self._stall_timeout_s or self._stall_killed is actor:
            return
        log.warning("trunk worker %d has made no step for %.1fs while holding %d request(s) (stall_timeout_s "
                    "%.1fs); killing it to restart it and resubmit them", self._incarnation, still, held,
                    self._stall_timeout_s)
        self.stalls += 1
        self._stall_killed = actor
        ray.kill(actor, no_restart=True)

    async def _restart(self, dead, cause: BaseException) -> None:
        if self._actor is not dead:
            return
        self._ready.clear()
        # Surely gone (a RayActorError may also mean unreachable), so its dispatcher routes no more: the controller
        # forgets it now rather than hold an expert drain up for its acknowledgement (dispatcher_ttl_s).
        ray.kill(dead, no_restart=True)
        self._forget_dispatcher()
        how = "was killed as stalled" if dead is self._stall_killed else "died"
        log.warning("trunk worker %d %s (%s); restarting it and resubmitting %d request(s)",
                    self._incarnation, how, type(cause).__name__, len(self._flights))
        if self.restarts >= self._max_restarts:
            self._fail(RuntimeError(f"{self.restarts} restarts already (max_restarts)"))
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._actor = await self._spawn()
                break
            except Exception as exc:  # noqa: BLE001 - try again, up to the limit
                log.error("trunk worker failed to start (attempt %d): %r", attempt, exc)
                if attempt == _START_ATTEMPTS or self._stopping:
                    self._fail(exc)
                    return
        for key in WORKER_COUNTERS:  # what the dead worker had counted by its last poll
            self._carried[key] += int(self._stats.get(key, 0))
        self._stats = {}
        self._steps_seen, self._step_clock = 0, time.monotonic()  # the new worker's clock starts now
        self._incarnation += 1
        self.restarts += 1
        for flight in list(self._flights.values()):
            if 0 <= flight.incarnation < self._incarnation:
                self._submit(flight)
                self.resubmitted += 1
        self._ready.set()
        self._changed()

    def _forget_dispatcher(self) -> None:
        """Tell the controller that the worker's expert dispatcher is gone (a worker that dies cannot)."""
        dispatcher, self._dispatcher = self._dispatcher, None
        _forget(dispatcher)

    def _replay(self, records: list[tuple], dropped: int) -> None:
        """Hand the worker's telemetry records to the observer (none attached: they are dropped)."""
        if dropped:
            self.telemetry_dropped += dropped
            log.warning("trunk worker %d left out %d telemetry record(s) (not polled in time)", self._incarnation,
                        dropped)
        observer = self._observer
        if observer is None or not records:
            return
        counters = {EXPERT_TOKENS: getattr(observer, EXPERT_TOKENS, None),
                    SCALING_EVENTS: getattr(observer, SCALING_EVENTS, None)}
        try:
            for record in records:
                kind = record[0]
                if kind == STEP:
                    observer.record_step(record[1], record[2])
                elif kind == QUEUE_WAIT:
                    observer.record_queue_wait(record[1])
                elif counters.get(kind) is not None:
                    counters[kind].add(record[1], record[2])
        except Exception:  # noqa: BLE001 - a broken observer loses telemetry, never the requests
            log.exception("the telemetry observer failed; dropping this poll's remaining records")

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        for flight in list(self._flights.values()):
            self._flights.pop(flight.request_id, None)
            flight.queue.put_nowait(EngineStoppedError(f"the trunk worker cannot be restarted: {exc!r}"))
        self._changed()

    def _changed(self) -> None:
        async def notify() -> None:
            async with self._progress:
                self._progress.notify_all()

        self._background(notify())

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    # -- outputs ------------------------------------------------------------------------------------
    def _deliver(self, flight: _Flight, item: object) -> None:
        if isinstance(item, tuple):  # an error record
            self._flights.pop(flight.request_id, None)
            flight.queue.put_nowait(error_from(item))
            self._changed()
            return
        out: RequestOutput = item
        if out.finished and out.finish_reason == "cancelled":
            # Not asked for by this edge (aborts pop the flight first): the worker is shutting down.
            self._flights.pop(flight.request_id, None)
            flight.queue.put_nowait(self._output(flight, [], "", "cancelled"))
            self._changed()
            return
        if flight.cached_prompt_tokens is None and out.new_token_ids:
            flight.cached_prompt_tokens = out.cached_prompt_tokens
        for i, token in enumerate(out.new_token_ids):
            reason = self._on_token(flight, token)
            if reason is None and out.finished and i == len(out.new_token_ids) - 1:
                reason = out.finish_reason  # one only the worker can tell (a structured output's grammar ended it)
            text = flight.detokenizer.take_delta(finished=reason is not None) if flight.detokenizer else ""
            logprobs = None if out.logprobs is None else out.logprobs[i:i + 1]
            prompt = out.prompt_logprobs if i == 0 else None
            flight.queue.put_nowait(self._output(flight, [token], text, reason, logprobs, prompt))
            if reason is not None:
                self._flights.pop(flight.request_id, None)
                if not out.finished and self._actor is not None:
                    self._actor.abort.remote(flight.request_id)  # a stop string matched here, not there
                self._changed()
                return

    def _on_token(self, flight: _Flight, token: int) -> str | None:
        """The finish reason after `token`, in LLMEngine's order: token stop, stop string, length."""
        if flight.first_token_time is None:
            flight.first_token_time = time.monotonic()
        flight.generated.append(token)
        params = flight.params
        if not params.ignore_eos and token in self._eos:
            return "eos"
        if token in params.stop_token_ids:
            return "stop"
        if flight.detokenizer is not None and flight.detokenizer.add_token(token):
            return "stop"
        if len(flight.generated) >= params.max_tokens:
            return "length"
        return None

    @staticmethod
    def _output(flight: _Flight, new_ids: list[int], text: str, reason: str | None,
                logprobs: list | None = None, prompt_logprobs: list | None = None) -> RequestOutput:
        ttft = None if flight.first_token_time is None else flight.first_token_time - flight.arrival
        return RequestOutput(flight.request_id, new_ids, text, reason is not None, reason, len(flight.prompt),
                             len(flight.generated), ttft, cached_prompt_tokens=flight.cached_prompt_tokens or 0,
                             logprobs=logprobs, prompt_logprobs=prompt_logprobs)


class _TrunkStream:
    """One request's outputs; closing it, cancelling its consumer or passing its deadline aborts it."""

    def __init__(self, engine: TrunkEngine, flight: _Flight, deadline: float | None):
        self.request_id = flight.request_id
        self._engine, self._queue, self._deadline = engine, flight.queue, deadline
        self._done = False

    def __aiter__(self) -> "_TrunkStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._next()
        except BaseException:
            self._close(finished=False)
            raise
        if isinstance(item, BaseException):
            self._close(finished=True)
            raise item
        if item.finished:
            self._close(finished=True)
        return item

    async def _next(self) -> RequestOutput | BaseException:
        if not self._queue.empty() or self._deadline is None:
            return await self._queue.get()
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(self._queue.get(), remaining)
        except TimeoutError:
            self._engine.abort(self.request_id)  # puts the final "cancelled" output, unless it ended meanwhile
            self._deadline = None
            return await self._queue.get()

    async def aclose(self) -> None:
        self._close(finished=False)

    def _close(self, finished: bool) -> None:
        if not self._done:
            self._done = True
            self._engine._release(self.request_id, finished)
