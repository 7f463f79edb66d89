"""LLMEngine: the synchronous core of the engine (add, step, abort), usable offline as is.

A step is: schedule -> flat batch -> forward -> logits of sampling rows -> sample -> update and stop
checks -> free finished. The core holds one lock over its bookkeeping, never over the forward, so
an abort from the asyncio thread frees a request's blocks at once even while a step runs (nothing
reuses a freed block before the next schedule, which happens on the step thread after this step).
`engine.AsyncEngine` drives it from a dedicated thread for the asyncio server.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .errors import InvalidRequestError, StepFailedError
from .model_runner import ModelRunner, num_kv_blocks
from .scheduler import Scheduler
from .speculative import NgramProposer
from .sampler import unpack_logprobs
from .structured import Grammars, accept
from .sequence import (RequestMetrics, RequestOutput, SamplingParams, Sequence, SequenceStatus, TokenLogprobs,
                       check_admission, length_reached, token_stop_reason)

log = logging.getLogger(__name__)


def load(config: EngineConfig) -> tuple[Any, Any]:
    """The model and tokenizer named by the config (the demo model when none is named).

    A checkpoint without tokenizer.json is served on token ids alone (no text, no stop strings).
    """
    from moeserve.models.loader import load_model
    from moeserve.models.tokenizer import load_tokenizer

    path = config.model
    if path is None:
        from moeserve.models.demo import ensure_demo_model

        path = str(ensure_demo_model())
    model = load_model(path, device=config.torch_device, dtype=config.torch_dtype, load_experts=config.load_experts)
    if config.expert_backend is not None:
        model.set_expert_backend(config.expert_backend(model))
    tokenizer = load_tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None
    return model, tokenizer


class LLMEngine:
    """Continuous batching over one model; synchronous and thread-safe (add/abort from any thread)."""

    def __init__(self, config: EngineConfig, model: Any, tokenizer: Any | None = None):
        self.config = config
        self.model = model
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.dtype = config.torch_dtype
        blocks = num_kv_blocks(config, model)
        self.max_model_len = _max_model_len(config, model.config.max_position_embeddings, blocks)
        self.block_manager = BlockManager(blocks, config.block_size, config.prefix_caching)
        proposer = (NgramProposer(config.speculative_tokens, config.ngram_min, config.ngram_max)
                    if config.speculative_tokens else None)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_queued_requests, proposer=proposer)
        self.runner = ModelRunner(model, config, blocks, self.max_model_len)
        if self.runner.graphs is not None:  # holding prompts back only pays where decode steps are graphs
            self.scheduler.prefill_hold_s = config.prefill_hold_ms / 1e3
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self._grammar_compiler: Grammars | None = None
        self._grammar_lock = threading.Lock()
        self.requests: dict[str, Sequence] = {}
        self.lock = threading.Lock()
        # busy_us: microseconds of step time, less any wait for expert groups in other processes (the
        # backend's expert_wait_s): over a window, the share of wall time the trunk itself was busy.
        # steps_ahead: decode steps queued before the previous step's tokens were back (look-ahead)
        self.counters = dict(steps=0, requests_added=0, prompt_tokens=0, tokens_computed=0, tokens_generated=0,
                             requests_finished=0, busy_us=0, steps_ahead=0)
        self.overlap_decode = config.overlap_decode and self.runner.graphs is not None
        self._inflight: tuple[Any, Any] | None = None  # (ScheduledBatch, Launched) queued ahead, not yet processed
        # Telemetry (or anything with record_step and record_queue_wait); called on the step thread
        self.observer: Any = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        return cls(config, *load(config))

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    deadline: float | None = None, resume: list[int] = ()) -> None:
        """Queue a request; raises InvalidRequestError or QueueFullError (nothing is queued then).

        `resume`: tokens the request already generated elsewhere (a restarted trunk worker's resubmission). They
        are its output so far, for max_tokens, min_tokens and the penalties, and a seeded request's generator is
        advanced past them, so the request goes on exactly as it would have; only new tokens are output."""
        self._validate(prompt_token_ids, params)
        resume = list(resume)
        if len(resume) >= params.max_tokens or any(not 0 <= t < self.model_config.vocab_size for t in resume):
            raise InvalidRequestError("resume", f"{len(resume)} tokens: must be fewer than max_tokens "
                                                f"({params.max_tokens}) and within the vocabulary")
        seq = Sequence(request_id, prompt_token_ids, params, time.monotonic(), deadline)
        seq.token_ids += resume
        if resume:
            seq.prompt_logprobs = None  # sent with the first token, before the resubmission
        if params.structured_output is not None:
            seq.grammar = self._grammars().matcher(params.structured_output)
            if not all(accept(seq.grammar, t) for t in resume):
                raise InvalidRequestError("resume", "the tokens do not follow the request's structured_output")
        if params.seed is not None and not params.greedy:
            seq.generator = self.runner.sampler.new_generator(params.seed)
            self.runner.sampler.advance(seq.generator, len(resume), self.model_config.vocab_size)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids, params.stop,
                                                     params.include_stop_str_in_output)
        with self.lock:
            if request_id in self.requests:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in flight; use a unique id")
            self.scheduler.add(seq)
            self.requests[request_id] = seq
            self.counters["requests_added"] += 1
            self.counters["prompt_tokens"] += seq.num_prompt_tokens

    def prepare(self, params: SamplingParams) -> None:
        """Do the slow part of admitting a request with these params ahead, off the caller's event loop (compiling
        a structured output: the compiler caches it for add_request); InvalidRequestError as add_request would."""
        if params.structured_output is not None:
            self._grammars().compiled(params.structured_output)  # (cached for add_request's matcher)

    def _grammars(self) -> Grammars:
        """The structured-output compiler of this engine's tokenizer, built on first use."""
        if self.tokenizer is None:
            raise InvalidRequestError("structured_output", "needs a tokenizer; this engine has none")
        with self._grammar_lock:  # not the engine's lock: building and compiling must not hold up steps
            if self._grammar_compiler is None:
                self._grammar_compiler = Grammars(self.tokenizer, self.model_config.vocab_size,
                                                  sorted(self.eos_token_ids))
            return self._grammar_compiler

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        check_admission(prompt, params, self.model_config.vocab_size, self.max_model_len, self.tokenizer is not None)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now ("cancelled") and free its blocks; None when it is not in flight."""
        with self.lock:
            seq = self.requests.pop(request_id, None)
            if seq is None:
                return None
            self.scheduler.finish(seq, "cancelled")
            self.counters["requests_finished"] += 1
            return self._output(seq, [], "")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def admissible_arrivals(self) -> tuple[float, float] | None:
        """Scheduler.admissible_arrivals (time.monotonic() times), under the engine's lock."""
        with self.lock:
            return self.scheduler.admissible_arrivals()

    # -- the step ---------------------------------------------------------------------------------
    def step(self, ready: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Run one scheduled batch; outputs for every request that got a token or ended. `ready`: see
        ModelRunner.run (not called when nothing was scheduled).

        With look-ahead (EngineConfig.overlap_decode, where decode steps replay graphs), a decode step
        is queued on the device before the previous step's tokens come back to the host
        (Scheduler.next_decode), so the GPU runs it while this thread does the bookkeeping of the one
        before; the next call processes it. A sequence that ended in between has its row dropped."""
        ready = _once(ready)
        with self.lock:
            start = time.monotonic()
            outputs = self._expire(start)
            inflight, self._inflight = self._inflight, None
            if inflight is not None and not any(s.status is SequenceStatus.RUNNING for s in inflight[0].seqs):
                inflight = None  # every sequence in it ended meanwhile: its tokens are not needed
            if inflight is None:
                batch, launched = self.scheduler.schedule(), None
            else:
                batch, launched = inflight
            waits = [start - s.arrival_time for s in batch.seqs if s.first_scheduled_time is None]
            for seq in batch.seqs:
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = start
        if not batch:
            return outputs
        backend = getattr(self.model, "experts_backend", None)
        waited = getattr(backend, "expert_wait_s", 0.0)
        try:
            if launched is None:
                launched = self.runner.launch(batch, ready)
            elif launched.deferred is not None:  # grammar rows: their masks now that the last tokens are fed
                self.runner.complete(launched)
            if self.overlap_decode and launched.decode_graph:
                self._launch_ahead(batch, launched)
            ready()
            sampled = launched.result()
            logprob_rows = launched.logprob_rows()
            prompt_rows = launched.prompt_logprob_rows()
        except Exception as exc:
            self._inflight = None
            with self.lock:
                failed = [s.request_id for s in batch.seqs if self.requests.get(s.request_id) is s]
                for rid in failed:
                    self.scheduler.finish(self.requests.pop(rid), "error")
            raise StepFailedError(failed, exc) from exc
        with self.lock:
            now = time.monotonic()
            c = self.counters
            c["steps"] += 1
            c["busy_us"] += max(0, round((now - start - (getattr(backend, "expert_wait_s", 0.0) - waited)) * 1e6))
            c["tokens_computed"] += batch.num_tokens
            if prompt_rows is not None:
                self._add_prompt_logprobs(launched.prompt_spans, prompt_rows)
            row_of = {}
            if logprob_rows is not None:  # each sampling sequence's first sampled row (a drafted one has more)
                at = 0
                for s, f, d in zip(batch.seqs, batch.sample_flags, batch.drafts):
                    if f:
                        row_of[id(s)] = at
                        at += 1 + len(d)
            before = {id(s): len(s) for s, d in zip(batch.seqs, batch.drafts) if d}  # drafted: tokens they had
            for seq in self.scheduler.postprocess(batch, sampled):
                count, k = len(seq) - before.get(id(seq), len(seq) - 1), seq.params.logprobs
                logprobs = None if k is None else [unpack_logprobs(logprob_rows[row_of[id(seq)] + j], k)
                                                   for j in range(count)]
                outputs.append(self._on_token(seq, now, logprobs, count))
        if self.observer is not None:
            self.observer.record_step(now - start, batch.num_tokens)
            for wait in waits:
                self.observer.record_queue_wait(wait)
        return outputs

    @staticmethod
    def _add_prompt_logprobs(spans: list, rows: list[list[float]]) -> None:
        """Each span's rows onto its sequence's prompt logprobs, where they continue them (a chunk recomputed after
        a preemption, or a sequence that ended meanwhile, adds nothing)."""
        at = 0
        for _, seq, first, count in spans:
            done = seq.prompt_logprobs
            if done is not None and len(done) == first and seq.status is SequenceStatus.RUNNING:
                k = seq.params.prompt_logprobs
                done += [unpack_logprobs(rows[at + j], k) for j in range(count)]
            at += count

    def _launch_ahead(self, batch, launched) -> None:
        """Queue the decode step after `batch` (still on the device) when the scheduler says it is
        the one that follows (Scheduler.next_decode); it becomes the next call's step."""
        with self.lock:
            nxt = self.scheduler.next_decode(batch)
        if nxt is None:
            return
        rows = None
        if len(nxt.seqs) != len(batch.seqs):
            index = {id(s): i for i, s in enumerate(batch.seqs)}
            rows = [index[id(s)] for s in nxt.seqs]
        ahead = self.runner.launch_next(nxt, launched, rows)
        if ahead is not None:
            self._inflight = (nxt, ahead)
            with self.lock:
                self.counters["steps_ahead"] += 1

    def _on_token(self, seq: Sequence, now: float, logprobs: list[TokenLogprobs] | None = None,
                  count: int = 1) -> RequestOutput:
        """The output of the `count` tokens a step appended to seq (more than one: a draft's, verified), with their
        log-probabilities when asked for: each checked in turn for a stop, those after a stop dropped."""
        new = seq.token_ids[len(seq) - count:]
        del seq.token_ids[len(seq) - count:]
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason, kept = None, []
        for token in new:
            seq.token_ids.append(token)
            kept.append(token)
            self.counters["tokens_generated"] += 1
            reason = self._stop_reason(seq, token)
            if reason is not None:
                break
        detok = seq.detokenizer
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
            self.counters["requests_finished"] += 1
        text = detok.take_delta(finished=reason is not None) if detok is not None else ""
        prompt, seq.prompt_logprobs = seq.prompt_logprobs, None  # complete with the first token; sent once
        return self._output(seq, kept, text, None if logprobs is None else logprobs[:len(kept)], prompt)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        """Why seq ends with `token` (its newest): a stop or end-of-sequence token, its structured output complete,
        a stop string, max_tokens; None when it goes on."""
        reason = token_stop_reason(seq, token, self.eos_token_ids)
        if seq.grammar is not None and reason is None:
            if not accept(seq.grammar, token):
                # cannot happen while the mask holds (the sampler only picks allowed tokens); end it rather than go on
                log.error("request %s: token %d is outside its structured output; ending it", seq.request_id, token)
                reason = "stop"
            elif seq.grammar.is_terminated():  # a stop token the tokenizer names and the model's config does not
                reason = "stop"
        detok = seq.detokenizer
        if reason is None and detok is not None and detok.add_token(token):
            reason = "stop"
        if reason is None and length_reached(seq):
            reason = "length"
        return reason

    def _expire(self, now: float) -> list[RequestOutput]:
        late = [s for s in self.requests.values() if s.deadline is not None and s.deadline <= now]
        for seq in late:
            del self.requests[seq.request_id]
            self.scheduler.finish(seq, "cancelled")
            self.counters["requests_finished"] += 1
        return [self._output(s, [], "") for s in late]

    @staticmethod
    def _output(seq: Sequence, new_ids: list[int], text: str, logprobs: list[TokenLogprobs] | None = None,
                prompt_logprobs: list[TokenLogprobs] | None = None) -> RequestOutput:
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time
        metrics = None
        if seq.is_finished:
            metrics = RequestMetrics(seq.request_id, seq.arrival_time, seq.first_scheduled_time, seq.first_token_time,
                                     time.monotonic(), seq.num_prompt_tokens, seq.num_completion_tokens,
                                     seq.finish_reason or "")
        return RequestOutput(seq.request_id, new_ids, text, seq.is_finished, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_completion_tokens, ttft, metrics,
                             seq.num_cached_prompt_tokens or 0, logprobs, prompt_logprobs)

    # -- offline ----------------------------------------------------------------------------------
    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion; one output per prompt with all its tokens and text."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        merged = {rid: RequestOutput(rid, [], "", False, None, len(pr), 0, None) for rid, pr in zip(ids, prompts)}
        while self.has_unfinished():
            for out in self.step():
                m = merged[out.request_id]
                m.new_token_ids += out.new_token_ids
                m.new_text += out.new_text
                m.finished, m.finish_reason = out.finished, out.finish_reason
                m.completion_tokens, m.time_to_first_token = out.completion_tokens, out.time_to_first_token
                m.cached_prompt_tokens = out.cached_prompt_tokens
                if out.logprobs is not None:
                    m.logprobs = (m.logprobs or []) + out.logprobs
                if out.prompt_logprobs is not None:
                    m.prompt_logprobs = out.prompt_logprobs
        return [merged[rid] for rid in ids]

    def stats(self) -> dict:
        """Gauges and counters now; `oldest_wait_s` is how long the oldest request never yet scheduled has waited."""
        with self.lock:
            queued = [s.arrival_time for s in self.scheduler.waiting if s.first_scheduled_time is None]
            return dict(
                waiting=len(self.scheduler.waiting),
                oldest_wait_s=time.monotonic() - min(queued) if queued else 0.0,
                running=len(self.scheduler.running),
                kv_blocks_used=self.block_manager.num_used_blocks,
                kv_blocks_total=self.block_manager.num_blocks,
                kv_blocks_cached=self.block_manager.num_idle_cached_blocks,
                block_size=self.block_manager.block_size,
                preemptions=self.scheduler.num_preemptions,
                prefix_cache_queried_tokens=self.block_manager.prefix_queried_tokens,
                prefix_cache_hit_tokens=self.block_manager.prefix_hit_tokens,
                draft_tokens=self.scheduler.num_draft_tokens,
                draft_tokens_accepted=self.scheduler.num_accepted_tokens,
                **self.counters,
            )


def _once(fn: Callable[[], None] | None) -> Callable[[], None]:
    """fn, callable any number of times but run at most once (a no-op for None)."""
    done = fn is None

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()
    return call


def _max_model_len(config: EngineConfig, model_max: int, num_blocks: int) -> int:
    capacity = num_blocks * config.block_size
    if config.max_model_len is None:
        return min(model_max, capacity)
    if config.max_model_len > model_max:
        raise ValueError(f"EngineConfig.max_model_len must be <= the model's {model_max}, got {config.max_model_len}")
    if config.max_model_len > capacity:
        raise ValueError(
            f"EngineConfig.max_model_len={config.max_model_len} does not fit the KV cache ({num_blocks} blocks of "
            f"{config.block_size} = {capacity} tokens); lower it or raise kv_cache_memory_bytes / num_kv_blocks")
    return config.max_model_len
