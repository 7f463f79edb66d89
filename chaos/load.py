"""Steady load over real gRPC: a closed loop keeping `concurrency` streams in flight, plus bursts.

Every request streams (GenerateStream, greedy, ignore_eos; some with penalties or a logit bias) and records
what the client saw. A request the server never answers is cut off by a watchdog well past its own deadline and
counted lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from moeserve.router.client import AsyncClient
from moeserve.v1 import inference_pb2 as pb

from .report import Outcome
from .workload import Workload

_WATCHDOG_EXTRA_S = 30.0  # past the request's own deadline: the client gives up and calls it lost
_FINISH = {pb.FinishReason.Value(n): n for n in ("length", "stop", "eos", "cancelled")}


class LoadGenerator:
    """Sends the workload's requests to `address`; `run` returns every request's Outcome."""

    def __init__(self, address: str, workload: Workload, prompts: list[list[int]]):
        self.address, self.workload, self.prompts = address, workload, prompts
        self.outcomes: list[Outcome] = []
        self.completed = 0
        self._progress = asyncio.Condition()
        self._client: AsyncClient | None = None
        self._bursts: set[asyncio.Task] = set()

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def in_flight(self) -> int:
        return self.sent - self.completed

    async def wait_completed(self, count: int) -> None:
        """Return once `count` requests have ended, one way or another."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.completed >= count)

    async def run(self, keep_going: Callable[[int], bool]) -> list[Outcome]:
        """Keep `concurrency` requests in flight while `keep_going(sent)`; wait for all, bursts too."""
        async with AsyncClient(self.address) as client:
            self._client = client
            await client.wait_ready(60.0)
            lanes = [asyncio.create_task(self._lane(keep_going)) for _ in range(self.workload.concurrency)]
            await asyncio.gather(*lanes)
            while self._bursts:
                await asyncio.gather(*list(self._bursts))
            self._client = None
        return sorted(self.outcomes, key=lambda o: o.index)

    def burst(self, count: int) -> list[asyncio.Task]:
        """Send `count` extra requests at once, beside the steady lanes (while `run` is running)."""
        tasks = [asyncio.create_task(self._one(self._new_outcome())) for _ in range(count)]
        self._bursts.update(tasks)
        for t in tasks:
            t.add_done_callback(self._bursts.discard)
        return tasks

    async def _lane(self, keep_going: Callable[[int], bool]) -> None:
        while keep_going(self.sent):
            await self._one(self._new_outcome())

    def _new_outcome(self) -> Outcome:
        i = len(self.outcomes)
        outcome = Outcome(index=i, prompt_index=i % len(self.prompts), start=time.monotonic())
        self.outcomes.append(outcome)
        return outcome

    async def _one(self, o: Outcome) -> None:
        w = self.workload
        call = self._client.generate_stream(token_ids=self.prompts[o.prompt_index], max_tokens=w.max_tokens,
                                            ignore_eos=True, request_id=f"chaos-{o.index}", timeout=w.deadline_s,
                                            **w.sampling(o.prompt_index))
        try:
            await asyncio.wait_for(self._read(call, o), w.deadline_s + _WATCHDOG_EXTRA_S)
            o.end = time.monotonic()
        except grpc.aio.AioRpcError as err:
            o.end, o.code, o.detail = time.monotonic(), err.code().name, err.details() or ""
        except TimeoutError:
            call.cancel()
            o.detail = "never answered"  # end stays None: lost
        async with self._progress:
            self.completed += 1
            self._progress.notify_all()

    @staticmethod
    async def _read(call, o: Outcome) -> None:
        async for msg in call:
            o.tokens += msg.token_ids
            o.finish_reason = _FINISH.get(msg.finish_reason)
            o.cached_prompt_tokens = max(o.cached_prompt_tokens, msg.usage.cached_prompt_tokens)
