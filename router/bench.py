"""Load generator for a running server: workload, arrivals, per-request timings and their summary.

Prompts are random token ids and every request sets ignore_eos, so prompt and output lengths are
exactly what the distributions drew. Arrivals are open-loop (Poisson at a rate: a slow server does
not slow the senders down) or closed-loop (a fixed number of requests in flight).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc


@dataclass(frozen=True, slots=True)
class Distribution:
    """Integer lengths: `N` or `fixed:N`, `uniform:A:B` (inclusive), `normal:MEAN:STD`, `lognormal:MEDIAN:SIGMA`."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> "Distribution":
        parts = spec.strip().split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", float(int(parts[0])))
            elif parts[0] == "fixed" and len(parts) == 2:
                dist = cls("fixed", float(int(parts[1])))
            elif parts[0] in ("uniform", "normal", "lognormal") and len(parts) == 3:
                dist = cls(parts[0], float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: use N, fixed:N, uniform:A:B, normal:MEAN:STD "
                             "or lognormal:MEDIAN:SIGMA") from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind != "uniform" and dist.b < 0):
            raise ValueError(f"length distribution {spec!r}: lengths must be >= 1 and the spread >= 0")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            x = self.a
        elif self.kind == "uniform":
            x = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            x = rng.gauss(self.a, self.b)
        else:
            x = self.a * math.exp(rng.gauss(0.0, self.b))
        return max(1, int(round(x)))

    def __str__(self) -> str:
        return f"fixed:{int(self.a)}" if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass(frozen=True, slots=True)
class WorkItem:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(n: int, prompt_len: Distribution, output_len: Distribution, *, vocab_size: int,
                  context_length: int, max_prompt_tokens: int, max_tokens_limit: int, seed: int,
                  shared_prefix_len: int = 0, num_shared_prefixes: int = 1) -> tuple[list[WorkItem], int]:
    """`n` requests drawn from the distributions, fitted to the server's limits; returns (items, number clipped).

    With `shared_prefix_len`, request i's prompt is shared prefix i mod `num_shared_prefixes` (random tokens,
    the same in every request that has it: a system prompt, few-shot examples) and then its own prompt_len
    tokens; a prompt is clipped from its end."""
    if shared_prefix_len < 0 or num_shared_prefixes < 1:
        raise ValueError(f"shared prefixes: need length >= 0 and count >= 1, got {shared_prefix_len} and "
                         f"{num_shared_prefixes}")
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab_size) for _ in range(shared_prefix_len)] for _ in range(num_shared_prefixes)]
    items, clipped = [], 0
    for i in range(n):
        want_p, want_o = shared_prefix_len + prompt_len.sample(rng), output_len.sample(rng)
        p = min(want_p, max_prompt_tokens, context_length - 1)
        o = min(want_o, max_tokens_limit, context_length - p)
        clipped += (p, o) != (want_p, want_o)
        own = [rng.randrange(vocab_size) for _ in range(max(0, p - shared_prefix_len))]
        items.append(WorkItem((prefixes[i % num_shared_prefixes] + own)[:p], o))
    return items, clipped


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from start) of a Poisson process at `rate` requests/s; inf: all at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed ^ 0x5EED)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass(slots=True)
class RequestRecord:
    prompt_tokens: int
    max_tokens: int
    start: float = 0.0  # seconds since the run began
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    server_ttft: float | None = None
    error: str | None = None  # gRPC status code name

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 in milliseconds; None where there is no value (JSON has no NaN)."""
    ms = [v * 1000.0 for v in values]
    if not ms:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": sum(ms) / len(ms), **{f"p{q}": percentile(ms, q) for q in (50, 90, 99)}}


def summarize(records: list[RequestRecord], duration: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": errors,
        "length_mismatches": sum(r.output_tokens != r.max_tokens for r in ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_token_throughput": out_tokens / duration if duration > 0 else 0.0,
        "input_token_throughput": sum(r.prompt_tokens for r in ok) / duration if duration > 0 else 0.0,
        "total_output_tokens": out_tokens,
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "e2e_ms": _stats_ms([r.end - r.start for r in ok if r.end is not None]),
    }


@dataclass
class BenchConfig:
    num_requests: int
    prompt_len: Distribution
    output_len: Distribution
    rate: float = math.inf  # requests/s (open loop); inf with concurrency: closed loop
    concurrency: int | None = None  # requests in flight at most (closed loop, or a cap on the open loop)
    seed: int = 0
    warmup: int = 0  # requests sent (one at a time) before timing; not counted
    timeout_s: float | None = None  # per-request deadline
    shared_prefix_len: int = 0  # tokens every prompt of one prefix group begins with (make_workload)
    num_shared_prefixes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


async def _one(client, item: WorkItem, rec: RequestRecord, t0: float, timeout: float | None) -> None:
    rec.start = time.perf_counter() - t0
    try:
        call = client.generate_stream(token_ids=item.prompt_token_ids, max_tokens=item.max_tokens,
                                      ignore_eos=True, timeout=timeout)
        async for msg in call:
            if msg.token_ids and rec.first_token is None:
                rec.first_token = time.perf_counter() - t0
            rec.output_tokens += len(msg.token_ids)
            if msg.time_to_first_token:
                rec.server_ttft = msg.time_to_first_token
        rec.end = time.perf_counter() - t0
    except grpc.RpcError as err:
        rec.error = err.code().name


async def run(client, items: list[WorkItem], cfg: BenchConfig, warmup_items: list[WorkItem] = ()) -> dict[str, Any]:
    """Drive `client` (an AsyncClient) with `items`; returns {"config", "summary", "requests"}."""
    for item in warmup_items:
        await _one(client, item, RequestRecord(len(item.prompt_token_ids), item.max_tokens), time.perf_counter(),
                   cfg.timeout_s)
    records = [RequestRecord(len(it.prompt_token_ids), it.max_tokens) for it in items]
    gate = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    times = arrival_times(len(items), cfg.rate, cfg.seed)

    async def send(i: int) -> None:
        if gate is None:
            await _one(client, items[i], records[i], t0, cfg.timeout_s)
            return
        async with gate:
            await _one(client, items[i], records[i], t0, cfg.timeout_s)

    t0 = time.perf_counter()
    tasks = []
    for i, at in enumerate(times):
        delay = at - (time.perf_counter() - t0)
        if delay > 0:  # the open-loop schedule itself: this request arrives `at` seconds in
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i)))
    await asyncio.gather(*tasks)
    duration = max((r.end or r.start) for r in records)
    return {
        "config": {
            "num_requests": cfg.num_requests, "prompt_len": str(cfg.prompt_len), "output_len": str(cfg.output_len),
            "rate": None if math.isinf(cfg.rate) else cfg.rate, "concurrency": cfg.concurrency, "seed": cfg.seed,
            "warmup": cfg.warmup, "shared_prefix_len": cfg.shared_prefix_len,
            "num_shared_prefixes": cfg.num_shared_prefixes, **cfg.extra,
        },
        "summary": summarize(records, duration),
        "requests": [{**asdict(r), "ttft": r.ttft, "tpot": r.tpot} for r in records],
    }


def format_summary(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"requests       {s['completed']} ok / {s['requests']} sent" + (f"  errors {s['errors']}" if s["errors"] else ""),
        f"duration       {s['duration_s']:.2f} s",
        f"throughput     {s['request_throughput']:.2f} req/s   {s['output_token_throughput']:.1f} output tok/s",
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "latency")):
        st = {k: ("-" if v is None else f"{v:.1f}") for k, v in s[key].items()}
        lines.append(f"{name:<14} p50 {st['p50']} ms   p90 {st['p90']} ms   p99 {st['p99']} ms")
    return "\n".join(lines)
