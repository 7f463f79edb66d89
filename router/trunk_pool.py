"""Several trunk workers behind one edge, scaled live: `moeserve serve --trunk-workers N`.

Each member is a `TrunkEngine` (router/trunk.py): its own `TrunkWorker` actor with the model trunk,
KV cache and scheduler, restarted with its requests resubmitted if it dies. The pool has the
`AsyncEngine` interface, so the gRPC server serves it as it serves one engine. A new request goes to
the serving member with the fewest requests in flight, unless its prompt begins with whole KV blocks
of a prompt a member took before (`PrefixAffinity`): then it goes there, where that prefix's KV is
likely cached (each member has its own KV cache), as long as that member is not too much busier than
the least busy. The expert groups (when there are any) are shared, one controller for every member.

`scale(n)` changes the number of serving members at once and finishes in the background: new members
start (their requests do not wait: the others serve meanwhile); a member leaving first stops getting
new requests, then finishes every request it holds (there is no time limit: each is bounded by its
max_tokens or deadline) and only then stops its worker. So scaling the trunk fails no request. The
last serving member is never drained.

`stats()` sums the members' gauges and counters; a drained member's counters stay in the sums, so
the rates computed from them (`moeserve status`, the autoscaler) never jump backwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .config import EngineConfig
from .errors import EngineStoppedError, InvalidRequestError
from .sequence import RequestOutput, SamplingParams
from .trunk import WORKER_COUNTERS, TrunkEngine

log = logging.getLogger(__name__)

STARTING, SERVING, DRAINING = "starting", "serving", "draining"
# Cumulative figures of LLMEngine.stats() (and the trunk's restarts and stalls): summed over every member that
# ever served.
COUNTERS = (*WORKER_COUNTERS, "trunk_restarts", "trunk_stalls")
_GAUGES = ("waiting", "running", "kv_blocks_used", "kv_blocks_total", "kv_blocks_cached", "requests_in_flight")


class PrefixAffinity:
    """Which member last took each prompt prefix of whole KV blocks, so that requests sharing a prefix (a system
    prompt, the turns of one conversation) go where its KV is cached instead of each member computing it.

    A prefix is keyed by a hash chained over its blocks (the blocks the engine's prefix cache could match: the
    whole ones before the prompt's last token). A collision only misroutes a request; the engine's cache compares
    tokens. At most `capacity` prefixes are remembered, the least recently routed forgotten first. The member of
    the longest known prefix is chosen while it holds at most max(SLACK, least / 2) requests more than the least
    busy member (`least`), so a popular prefix cannot pile every request onto one member."""

    SLACK = 8

    def __init__(self, block_size: int, capacity: int = 1 << 16):
        self.block_size = block_size
        self.capacity = capacity
        self._owner: OrderedDict[int, int] = OrderedDict()  # prefix key -> member index
        self.routed = 0  # requests that went to the member holding their prefix

    def keys(self, prompt: list[int]) -> list[int]:
        bs, out, key = self.block_size, [], 0
        for i in range((len(prompt) - 1) // bs):
            key = hash((key, tuple(prompt[i * bs:(i + 1) * bs])))
            out.append(key)
        return out

    def choose(self, keys: list[int], loads: dict[int, int]) -> int | None:
        """The member (index) to take a prompt of these prefix keys, given the serving members' loads; None: no
        member holds its prefix, or the one that does is too busy."""
        if not loads:
            return None
        least = min(loads.values())
        for key in reversed(keys):
            owner = self._owner.get(key)
            if owner in loads:
                return owner if loads[owner] <= least + max(self.SLACK, least // 2) else None
        return None

    def record(self, keys: list[int], index: int) -> None:
        for key in keys:
            self._owner[key] = index
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)


@dataclass(eq=False)
class _Member:
    index: int
    engine: TrunkEngine
    state: str = STARTING
    task: asyncio.Task | None = None  # its start or drain, while one runs


class TrunkPool:
    """The AsyncEngine interface over `replicas` trunk workers, scaled live by `scale`."""

    def __init__(self, config: EngineConfig, *, replicas: int = 1, max_replicas: int = 64,
                 engine_factory: Callable[[EngineConfig], TrunkEngine] | None = None, prefix_routing: bool = True,
                 **engine_options):
        if replicas < 1:
            raise ValueError(f"trunk workers: must be >= 1, got {replicas}")
        if max_replicas < replicas:
            raise ValueError(f"max trunk workers: must be >= the {replicas} asked for, got {max_replicas}")
        if config.model is None:
            from moeserve.models.demo import ensure_demo_model

            config = dataclasses.replace(config, model=str(ensure_demo_model()))
        self.config: EngineConfig = config
        self._factory = engine_factory or (lambda cfg: TrunkEngine(cfg, **engine_options))
        self._initial = replicas
        self.max_replicas = max_replicas
        self._members: list[_Member] = []
        self._numbers = itertools.count()
        self._observer = None
        self._retired = dict.fromkeys(COUNTERS, 0)  # counters of members that left
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events: list[str] = []  # what scale() did, oldest first (the last 1000)
        self._start_errors: list[BaseException] = []
        # prefix_routing False (or no prefix cache to find): every request to the least busy member
        self.affinity = PrefixAffinity(config.block_size) if config.prefix_caching and prefix_routing else None
        first = self._add()  # the edge reads the model's facts from it before anything starts
        self.model_config = first.engine.model_config
        self.tokenizer = first.engine.tokenizer
        self.dtype = first.engine.dtype
        self.max_model_len = 0  # known once a member has started

    # -- members -----------------------------------------------------------------------------------
    def _add(self) -> _Member:
        member = _Member(next(self._numbers), self._factory(self.config))
        if self._observer is not None and hasattr(member.engine, "observe"):
            member.engine.observe(self._observer)
        self._members.append(member)
        return member

    def members(self, state: str | None = None) -> list[_Member]:
        return [m for m in self._members if state is None or m.state == state]

    @property
    def replicas(self) -> int:
        """Serving members: those new requests go to."""
        return len(self.members(SERVING))

    @property
    def pending(self) -> int:
        """Members still starting."""
        return len(self.members(STARTING))

    @property
    def worker(self):
        """The TrunkWorker actor of the first serving member (the chaos suite kills it)."""
        serving = self.members(SERVING)
        return serving[0].engine.worker if serving else None

    @property
    def restarts(self) -> int:
        return sum(m.engine.restarts for m in self._members) + self._retired["trunk_restarts"]

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the first `replicas` members; return once one serves (the others go on starting in the
        background: one may wait for a node the autoscaler has yet to add). Raises if none can start."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        while len(self._members) < self._initial:
            self._add()
        for m in self._members:
            m.task = self._loop.create_task(self._start_member(m))
        while not self.members(SERVING):
            starting = [m.task for m in self.members(STARTING) if m.task is not None]
            if not starting:
                self._stopping = True
                raise EngineStoppedError(f"no trunk worker could start: {self._start_errors[-1]!r}"
                                         if self._start_errors else "no trunk worker could start")
            await asyncio.wait(starting, return_when=asyncio.FIRST_COMPLETED)

    async def settled(self) -> None:
        """Return once no member is starting or draining (every start and drain set going has ended)."""
        while True:
            tasks = [m.task for m in self._members if m.task is not None and m.state in (STARTING, DRAINING)]
            if not tasks:
                return
            await asyncio.wait(tasks)

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop every member: in-flight requests get `grace_s` to finish, the rest end as "cancelled"."""
        self._stopping = True
        members = list(self._members)
        for m in members:
            if m.task is not None:
                m.task.cancel()
        await asyncio.gather(*(m.engine.shutdown(grace_s) for m in members), return_exceptions=True)

    # -- scaling -----------------------------------------------------------------------------------
    def scale(self, replicas: int) -> str:
        """Move to `replicas` serving members (1..max_replicas): start new ones or drain the least busy.

        Returns at once, saying what it set going; the starts and drains finish in the background.
        Members still starting count towards the target and leave first (their start is stopped: a
        worker waiting for resources no node offers is given up); a draining one is not taken back.
        """
        if self._loop is None or self._stopping:
            raise EngineStoppedError("the trunk pool is not running (not started, or shutting down)")
        if not 1 <= replicas <= self.max_replicas:
            raise ValueError(f"trunk workers: must be in [1, {self.max_replicas}], got {replicas}")
        current = self.members(SERVING) + self.members(STARTING)
        if replicas > len(current):
            for _ in range(replicas - len(current)):
                member = self._add()
                member.task = self._loop.create_task(self._start_member(member))
            message = f"trunk workers: starting {replicas - len(current)} (to {replicas})"
        elif replicas < len(current):
            # Members still starting go first (they hold nothing), then the serving ones with the fewest requests.
            order = sorted(current, key=lambda m: (m.state != STARTING, self._in_flight(m), -m.index))
            leaving = order[: len(current) - replicas]
            for member in leaving:
                if member.state == STARTING:  # holds no request: its start is stopped (the actor killed)
                    member.task.cancel()
                else:
                    member.task = self._loop.create_task(self._drain_member(member))
                member.state = DRAINING
            message = (f"trunk workers: draining {len(leaving)} (to {replicas}): "
                       + ", ".join(f"#{m.index} with {self._in_flight(m)} in flight" for m in leaving))
        else:
            message = f"trunk workers: already {replicas}"
        self._say(message)
        return message

    def scaler(self) -> Callable[[int], str]:
        """`scale` callable from another thread (the autoscaler's): runs on the pool's event loop."""
        loop = self._loop
        if loop is None:
            raise EngineStoppedError("start the trunk pool before asking for its scaler")

        def scale_from_thread(replicas: int) -> str:
            return asyncio.run_coroutine_threadsafe(self._scale_async(replicas), loop).result(30.0)

        return scale_from_thread

    async def _scale_async(self, replicas: int) -> str:
        return self.scale(replicas)

    async def _start_member(self, member: _Member) -> None:
        try:
            await member.engine.start()
        except asyncio.CancelledError:  # scaled down before it served (perhaps still waiting for resources)
            await member.engine.shutdown(0)
            self._remove(member)
            self._say(f"trunk worker #{member.index} stopped before it served")
            return
        except Exception as exc:  # noqa: BLE001 - one member that cannot start leaves the others serving
            log.error("trunk worker #%d failed to start: %r", member.index, exc)
            self._start_errors = [*self._start_errors[-9:], exc]
            await member.engine.shutdown(0)
            self._remove(member)
            self._say(f"trunk worker #{member.index} failed to start: {exc!r}")
            return
        member.task = None
        member.state = SERVING
        self.max_model_len = min(self.max_model_len or member.engine.max_model_len, member.engine.max_model_len)
        self._say(f"trunk worker #{member.index} serving ({self.replicas} in all)")

    async def _drain_member(self, member: _Member) -> None:
        held = len(member.engine.in_flight)
        # No time limit: the member takes no new request, and each it holds ends by itself (max_tokens, deadline).
        await member.engine.wait_idle()
        await member.engine.shutdown(0)
        self._remove(member)
        self._say(f"trunk worker #{member.index} drained: the {held} request(s) it held when asked to leave "
                  f"finished there; {self.replicas} serving")

    def _remove(self, member: _Member) -> None:
        if member not in self._members:
            return
        stats = member.engine.stats()
        for key in COUNTERS:
            self._retired[key] += int(stats.get(key, 0))
        self._members.remove(member)

    @staticmethod
    def _in_flight(member: _Member) -> int:
        return len(member.engine.in_flight)

    def _say(self, message: str) -> None:
        log.info("%s", message)
        self.events.append(message)
        del self.events[:-1000]

    # -- requests ----------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request on the serving member that took its prompt's prefix (PrefixAffinity), else on the least
        busy; raises at call time as AsyncEngine does."""
        if self._stopping or self._loop is None:
            raise EngineStoppedError("the engine is not running (not started, or shutting down)")
        if any(request_id in m.engine.in_flight for m in self._members):
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight; use a unique id")
        candidates = sorted(self.members(SERVING), key=lambda m: (self._in_flight(m), m.index))
        keys = self.affinity.keys(prompt_token_ids) if self.affinity is not None else []
        if keys:
            owner = self.affinity.choose(keys, {m.index: self._in_flight(m) for m in candidates})
            if owner is not None:
                candidates.sort(key=lambda m: m.index != owner)  # stable: the rest stay least busy first
        last: EngineStoppedError | None = None
        for member in candidates:
            try:
                stream = member.engine.generate(request_id, prompt_token_ids, params, deadline)
            except EngineStoppedError as exc:  # that member's worker could not be restarted: try the next
                last = exc
                continue
            if keys:
                self.affinity.routed += member.index == owner
                self.affinity.record(keys, member.index)
            return stream
        raise last or EngineStoppedError("no trunk worker is serving")

    def abort(self, request_id: str) -> None:
        for m in self._members:
            m.engine.abort(request_id)  # a no-op where it is not in flight

    def observe(self, observer) -> None:
        """Report every member's step times and queue waits (and its experts' load) to `observer`."""
        self._observer = observer
        for m in self._members:
            if hasattr(m.engine, "observe"):
                m.engine.observe(observer)

    def stats(self) -> dict:
        """Gauges summed over the members (oldest_wait_s: the largest), counters over every member that served."""
        per_member = [m.engine.stats() for m in self._members]
        out: dict = {key: sum(int(s.get(key, 0)) for s in per_member) for key in _GAUGES}
        out["oldest_wait_s"] = max((float(s.get("oldest_wait_s", 0.0)) for s in per_member), default=0.0)
        out["block_size"] = next((s["block_size"] for s in per_member if "block_size" in s), self.config.block_size)
        for key in COUNTERS:
            out[key] = self._retired[key] + sum(int(s.get(key, 0)) for s in per_member)
        out.update(trunk_workers=self.replicas, trunk_workers_starting=self.pending,
                   trunk_workers_draining=len(self.members(DRAINING)),
                   requests_routed_by_prefix=self.affinity.routed if self.affinity is not None else 0)
        return out
