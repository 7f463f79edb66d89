"""The device side of a step: KV cache sizing, the flat batch tensors, forward, logits, sampling.

One host sync per step (the sampled ids coming back as a list). The batch is built in Python
lists once per step and copied to the device in one go per tensor (pinned, non-blocking on CUDA).
Decode-only steps go through DecodeGraphs, steps of first chunks through PromptGraphs, chunks after a
cached prefix through ChunkGraphs, and a step of several of these kinds through each, one replay after
the other (router/cuda_graphs.py), where configured: padded to a bucket and replayed from a captured
CUDA graph on a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from moeserve.models.batch import AttentionBatch
from moeserve.models.layers import decode_attention

from .block_manager import num_blocks_for_budget
from .config import DEFAULT_CPU_KV_BYTES, EngineConfig
from .cuda_graphs import ChunkGraphs, DecodeGraphs, PromptGraphs
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import SequenceStatus

log = logging.getLogger(__name__)


def kv_cache_budget_bytes(config: EngineConfig, model: Any) -> int:
    """Bytes the KV cache may take: the configured budget, or on CUDA a share of free memory minus activations."""
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    if config.torch_device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    free, _total = torch.cuda.mem_get_info(config.torch_device)
    return int(free * config.gpu_memory_fraction) - activation_bytes(config, model)


def prompt_graph_tokens(config: EngineConfig) -> int:
    """The largest padded prompt or chunk step run as a graph: EngineConfig.prompt_graph_tokens within the step budget."""
    return min(config.max_num_batched_tokens, config.prompt_graph_tokens)


def activation_bytes(config: EngineConfig, model: Any) -> int:
    """Rough peak activation memory of one step at the full token budget (an estimate, not a profile)."""
    mc = model.config
    elt = torch.empty((), dtype=config.torch_dtype).element_size()
    widest = max(mc.hidden_size, mc.intermediate_size, mc.moe.moe_intermediate_size * mc.moe.num_experts_per_tok)
    per_token = (8 * mc.hidden_size + 4 * widest) * elt
    logits = config.max_num_seqs * mc.vocab_size * 4 * 4  # float32 logits, probs, sort buffers
    # Decode graphs keep their own memory pool; its peak is about one layer's padded K and V gathers.
    # Prompt graphs keep another, as large as the activations of their largest step.
    graphs = 0
    if config.decode_graphs == "auto":
        graphs = 2 * decode_attention.MAX_GATHER_BYTES + prompt_graph_tokens(config) * per_token
    return config.max_num_batched_tokens * per_token + logits + graphs


def num_kv_blocks(config: EngineConfig, model: Any) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    blocks = num_blocks_for_budget(kv_cache_budget_bytes(config, model), model.kv_cache_bytes_per_token(), config.block_size)
    if blocks < 1:
        raise ValueError(
            f"the KV cache budget holds no block of {config.block_size} tokens; raise EngineConfig.kv_cache_memory_bytes "
            f"or gpu_memory_fraction ({model.kv_cache_bytes_per_token()} bytes per token)"
        )
    return blocks


@dataclass
class FlatBatch:
    """A step's batch as plain lists, before it becomes device tensors."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]  # block_id * block_size + offset of each token's KV
    context_lens: list[int]
    block_tables: list[list[int]]  # padded with 0 to the longest table
    sample_rows: list[int]  # the last row of each sequence that samples


def prompt_logprob_spans(batch: ScheduledBatch) -> list[tuple[int, Any, int, int]]:
    """(batch index, sequence, first position, count) of the prompt positions in this step whose next token is a
    prompt token and whose log-probability a sequence asked for and does not have yet (a recomputed chunk after a
    preemption has some already)."""
    spans = []
    for i, (seq, start, n) in enumerate(zip(batch.seqs, batch.starts, batch.num_new_tokens)):
        done = seq.prompt_logprobs
        if done is None:
            continue
        first = max(start, len(done))
        end = min(start + n, seq.num_prompt_tokens - 1)  # the last prompt position's next token is generated
        if first < end:
            spans.append((i, seq, first, end - first))
    return spans


def flatten(batch: ScheduledBatch, block_size: int, tables: bool = True) -> FlatBatch:
    """Lay out the scheduled chunks back to back: each sequence's tokens [computed, computed + n)."""
    bs = block_size
    flat = FlatBatch([], [], [], [], [], [])
    for n, samples, start, chunk, table, draft in zip(batch.num_new_tokens, batch.sample_flags, batch.starts,
                                                     batch.chunks, batch.tables, batch.drafts):
        end = start + n
        flat.input_ids.extend(chunk)
        flat.positions.extend(range(start, end))
        pos = start
        while pos < end:  # one range per block touched, not one Python step per token
            lo = pos % bs
            hi = min(bs, lo + end - pos)
            base = table[pos // bs] * bs
            flat.slot_mapping.extend(range(base + lo, base + hi))
            pos += hi - lo
        flat.context_lens.append(end)
        if samples:  # the last position; a drafted decode's every position (its token's, then the draft's)
            flat.sample_rows.extend(range(len(flat.input_ids) - 1 - len(draft), len(flat.input_ids)))
    if tables:  # padded block tables (the graph path takes the sequences' own)
        width = max(map(len, batch.tables), default=0)
        flat.block_tables = [t + [0] * (width - len(t)) for t in batch.tables]
    return flat


class ModelRunner:
    """Runs scheduled batches through the model and samples the next tokens."""

    def __init__(self, model: Any, config: EngineConfig, num_blocks: int, max_model_len: int | None = None):
        self.model = model
        self.device = config.torch_device
        if self.device.type == "cuda":
            # cuDNN's fused attention builds an execution plan for every new shape of the padded prefill
            # attention, and a server's mixed steps each have a shape of their own: on an H200 that cost
            # 1.2-1.6 s for the first and 45-100 ms for each after (benchmarks/profile_engine.py). SDPA's
            # other backends need no plan. (A process-wide switch: this process serves the model.)
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.graphs = self._decode_graphs(config, max_model_len)
        # Prompt graphs go with decode graphs (same mode), their token buckets within one step's budget.
        self.prompts = None if self.graphs is None else PromptGraphs(
            model, self.device, config.max_num_seqs, prompt_graph_tokens(config), config.block_size,
            pad_block=num_blocks, capture=self.graphs.capture)
        # Chunks after a cached prefix (prefix-cache hits, a long prompt's later chunks) likewise, where every
        # layer's attention takes the fixed plan (models/causal_lm.takes_chunk_plans): GQA's captured at start-up.
        takes = getattr(model, "takes_chunk_plans", None)
        self.chunks = ChunkGraphs(
            model, self.device, config.max_num_seqs, prompt_graph_tokens(config), config.block_size,
            pad_block=num_blocks, max_blocks_per_seq=self.graphs.max_blocks, capture=self.graphs.capture,
            share_pool_of=self.prompts,
        ) if self.graphs is not None and takes is not None and takes(self.device) else None
        # With decode graphs, one block past the block manager's takes the padding rows' KV writes.
        extra = 1 if self.graphs is not None else 0
        model.allocate_kv_cache(num_blocks + extra, config.block_size, device=self.device, dtype=config.torch_dtype)
        self.sampler = Sampler(self.device, config.seed)
        self.split_steps = 0  # steps of two or three kinds (first chunks, later chunks, decodes) run as graph replays
        self._pin = self.device.type == "cuda"
        self._warm_up_experts(config)
        if self.graphs is not None and self.graphs.capture:
            start = time.monotonic()
            with torch.inference_mode(), torch.cuda.device(self.device):
                self.graphs.capture_ahead(config.graph_capture_tokens)
                self.prompts.capture_ahead()
                if self.chunks is not None:
                    self.chunks.capture_ahead()
            log.info("%s in %.1f s (decode contexts up to %d tokens at start-up; longer ones on first use)",
                     self.describe_graphs(), time.monotonic() - start, config.graph_capture_tokens)
        if self.device.type == "cuda" and self._local_experts():  # remote expert groups may not be up yet
            budget = config.max_num_batched_tokens
            self.warm_up_step(budget, min(max_model_len or budget, budget), config.max_num_seqs)

    def describe_graphs(self) -> str | None:
        """One line on the decode and prompt graphs (for logs and benchmark reports); None when off."""
        if self.graphs is None:
            return None
        return ", ".join(g.describe() for g in (self.graphs, self.prompts, self.chunks) if g is not None)

    def _warm_up_experts(self, config: EngineConfig) -> None:
        """On a GPU, compile the expert kernels of every step size up to max_num_batched_tokens now
        (LocalExperts.warm_up), not in the middle of serving."""
        backend = getattr(self.model, "experts_backend", None)
        if self.device.type != "cuda" or not hasattr(backend, "warm_up"):
            return
        start = time.monotonic()
        with torch.inference_mode(), torch.cuda.device(self.device):
            counts = backend.warm_up(self.model.config.moe.num_experts_per_tok, config.max_num_batched_tokens,
                                     config.torch_dtype)
        log.info("expert kernels warmed up for %d step sizes (%s tokens) in %.1f s", len(counts),
                 ", ".join(map(str, counts)), time.monotonic() - start)

    @torch.inference_mode()
    def warm_up_step(self, tokens: int, length: int, max_seqs: int) -> None:
        """Run one eager step of `tokens` prompt tokens (sequences of `length`, at most max_seqs of
        them) and its logits, output discarded: the largest step the engine schedules eagerly, run once
        at start-up (on a GPU) so that the caching allocator grows to its peak and cuBLAS picks its
        kernels for these sizes now, not during the first burst of requests; and a token budget whose
        activations do not fit fails here, not in a served step. Its KV writes go to blocks that hold
        nothing yet (no request has run); a request overwrites its blocks' slots before it reads them."""
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(self.device)
        start = time.monotonic()
        bs, blocks = self.block_size, self.num_blocks
        lens = [length] * min(max_seqs, tokens // length) or [tokens]
        per_seq = -(-max(lens) // bs)
        tables = [[(i * per_seq + j) % blocks for j in range(per_seq)] for i in range(len(lens))]
        slots = [tables[i][p // bs] * bs + p % bs for i, n in enumerate(lens) for p in range(n)]
        positions = [p for n in lens for p in range(n)]
        batch = AttentionBatch(query_lens=lens, context_lens=lens,
                               block_tables=self._to_device(tables, torch.int32),
                               slot_mapping=self._to_device(slots, torch.int64), block_size=bs)
        with torch.cuda.device(self.device) if on_cuda else contextlib.nullcontext():
            try:
                hidden = self.model.forward(self._to_device([0] * len(slots), torch.int64),
                                            self._to_device(positions, torch.int64), batch)
                last = self._to_device(list(itertools.accumulate(lens)), torch.int64) - 1
                self.model.compute_logits(hidden.index_select(0, last))
                if on_cuda:
                    torch.cuda.synchronize(self.device)
            except torch.OutOfMemoryError as exc:
                raise RuntimeError(
                    f"a step of {len(slots)} tokens (max_num_batched_tokens) does not fit in device memory beside "
                    f"the KV cache ({blocks} blocks): lower max_num_batched_tokens, kv_cache_memory_bytes or "
                    f"gpu_memory_fraction") from exc
        log.info("warm-up step of %d prompt tokens (%d sequences) in %.2f s", len(slots), len(lens),
                 time.monotonic() - start)

    def _local_experts(self) -> bool:
        """Whether the model's routed experts run in this process (LocalExperts), not in expert groups."""
        from moeserve.models.local_experts import LocalExperts

        return isinstance(getattr(self.model, "experts_backend", None), LocalExperts)

    def _decode_graphs(self, config: EngineConfig, max_model_len: int | None) -> DecodeGraphs | None:
        mode = config.decode_graphs
        if mode == "off" or max_model_len is None:
            return None
        if mode == "auto":
            # Only a step that stays on this GPU can be captured: experts in other processes are not.
            if self.device.type != "cuda" or not self._local_experts():
                return None
        max_blocks = (max_model_len + config.block_size - 1) // config.block_size
        return DecodeGraphs(self.model, self.device, config.max_num_seqs, max_blocks, config.block_size,
                            pad_block=self.num_blocks, capture=mode == "auto")

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True) if self._pin else t

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        """(input_ids [T], positions [T], AttentionBatch, rows whose logits are sampled [N])."""
        flat = flatten(batch, self.block_size)
        attn = AttentionBatch(
            query_lens=list(batch.num_new_tokens),
            context_lens=flat.context_lens,
            block_tables=self._to_device(flat.block_tables, torch.int32),
            slot_mapping=self._to_device(flat.slot_mapping, torch.int64),
            block_size=self.block_size,
        )
        return (self._to_device(flat.input_ids, torch.int64), self._to_device(flat.positions, torch.int64), attn,
                self._to_device(flat.sample_rows, torch.int64))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, ready: Callable[[], None] | None = None) -> list[int]:
        """Forward the batch; one sampled token per sequence that reaches its last token, in batch order.

        `ready` (called once) marks where this thread stops needing the interpreter for a while: after
        a graph's replay and the sampler are queued, when only the wait for the GPU is left; at the
        start of an eager step, whose launching is the step's CPU work anyway. AsyncEngine hands the
        previous step's outputs to the event loop there, so the loop streams them while the GPU runs
        instead of contending for the GIL with this step's launches."""
        launched = self.launch(batch, ready)
        if launched.graphed and ready is not None:
            ready()
        return launched.result()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, ready: Callable[[], None] | None = None) -> "Launched":
        """Queue the batch's forward and sampling; the tokens stay on the device (Launched.result).
        `ready` as in run(), but called here only for an eager step (at its start): after a graph
        step the caller calls it, once it has queued what it wants to queue."""
        if self._pin:  # on cuda:N, N the current device of the step's thread (graph replay, event, streams)
            with torch.cuda.device(self.device):
                return self._launch(batch, ready)
        return self._launch(batch, ready)

    @torch.inference_mode()
    def launch_next(self, batch: ScheduledBatch, prev: "Launched", rows: list[int] | None) -> "Launched | None":
        """Queue the decode step after `prev` (Scheduler.next_decode's batch) behind it on the device:
        its input ids are prev's sampled ids, rows `rows` of them (None: all), copied device to device,
        so the host never waits between the two steps. None when no decode graph runs it (the step is
        then scheduled the usual way once prev is back)."""
        if self.graphs is None or not self.graphs.supports(len(batch.seqs), max(map(len, batch.tables))):
            return None
        if self._pin:
            with torch.cuda.device(self.device):
                return self._launch_next(batch, prev, rows)
        return self._launch_next(batch, prev, rows)

    @torch.inference_mode()
    def complete(self, launched: "Launched") -> None:
        """Queue a look-ahead step's late sampling (launch_next of a step with grammar rows), once the tokens of the
        step before it have been fed to the matchers on the host."""
        if self._pin:
            with torch.cuda.device(self.device):
                launched.complete()
        else:
            launched.complete()

    def _launch_next(self, batch: ScheduledBatch, prev: "Launched", rows: list[int] | None) -> "Launched | None":
        ids = prev.tokens if rows is None else prev.tokens.index_select(0, self._to_device(rows, torch.int64))
        hidden, _ = self._run_decodes(batch, input_tokens=ids)
        if hidden is None:
            return None
        if any(s.params.needs_last_token for s in batch.seqs):
            # A grammar's mask needs the previous token fed to its matcher on the host: the forward and the logits
            # are queued now, the sampling once that token is back (Launched.complete), while the GPU runs them.
            logits = self.model.compute_logits(hidden)
            return Launched(None, None, graphed=True, decode_graph=True,
                            deferred=lambda: self._sample_logits(logits, batch.seqs, live=True))
        return Launched(*self._sample(hidden, batch.seqs, pending=ids), graphed=True, decode_graph=True)

    def _sample(self, hidden: torch.Tensor, seqs: list, pending: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sampled ids [N], and when a sequence asks for them Sampler.logprobs rows [N, 1 + 2k], else None).
        `pending`: a look-ahead step's input ids on the device, each row's last token not yet in its history."""
        return self._sample_logits(self.model.compute_logits(hidden), seqs, pending)

    def _sample_logits(self, logits: torch.Tensor, seqs: list, pending: torch.Tensor | None = None,
                       live: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """_sample from the logits. `live`: only running sequences' grammars mask their rows (a late sampling's
        sequence that ended meanwhile has its row dropped; its matcher may be done)."""
        histories = None
        if any(s.params.reads_history for s in seqs):  # (tokens so far, prompt length, what min_tokens holds back)
            eos = set(self.model.config.eos_token_ids)
            histories = [(s.token_ids, s.num_prompt_tokens, set(s.params.stop_token_ids) | (set() if s.params.ignore_eos
                                                                                           else eos))
                         if s.params.reads_history else None for s in seqs]
        grammars = [s.grammar if not live or s.status is SequenceStatus.RUNNING else None for s in seqs] \
            if any(s.grammar is not None for s in seqs) else None
        tokens = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs], histories, grammars,
                              pending if histories is not None else None)
        wanted = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
        return tokens, (self.sampler.logprobs(logits, tokens, max(wanted)) if wanted else None)

    def _run_prompts(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A step of first chunks through the prompt graphs: (hidden states of the padded step, the
        rows to sample), or (None, None) when its graph could not be captured."""
        return self._run_padded(batch, self.prompts.run)

    def _run_chunks(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A step of chunks after cached prefixes through the chunk graphs, as _run_prompts."""
        return self._run_padded(batch, lambda ids, slots: self.chunks.run(ids, slots, batch.starts, batch.tables))

    def _run_padded(self, batch: ScheduledBatch, run: Callable[[list, list], tuple[torch.Tensor, int] | None]
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each sequence's chunk (token ids, KV slots) to `run`, a padded step whose row i * length + j is
        chunk i's token j: its hidden states and the last row of each chunk that samples."""
        flat = flatten(batch, self.block_size, tables=False)
        ids, slots, at = [], [], 0
        for n in batch.num_new_tokens:
            ids.append(flat.input_ids[at:at + n])
            slots.append(flat.slot_mapping[at:at + n])
            at += n
        out = run(ids, slots)
        if out is None:
            return None, None
        hidden, length = out
        rows = [i * length + n - 1 for i, (n, f) in enumerate(zip(batch.num_new_tokens, batch.sample_flags)) if f]
        return hidden, self._to_device(rows, torch.int64)

    def _run_decodes(self, batch: ScheduledBatch, input_tokens: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A decode-only step through the decode graphs: (hidden states, the rows to sample), or
        (None, None) when its graph could not be captured. input_tokens: the ids, on the device, of a
        look-ahead step (its chunks are empty: the ids are not on the host yet)."""
        flat = flatten(batch, self.block_size, tables=False)
        ids = flat.input_ids if input_tokens is None else [0] * len(batch.seqs)
        hidden = self.graphs.run(ids, flat.positions, flat.slot_mapping, flat.context_lens, batch.tables,
                                 input_tokens=input_tokens)
        if hidden is None or input_tokens is not None:  # a look-ahead step samples every row, in order
            return hidden, None
        return hidden, self._to_device(flat.sample_rows, torch.int64)

    def _graphed(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden states, the rows of them to sample in batch order) of a step the graphs can run, else
        (None, None): first chunks (prompt graphs), chunks after a cached prefix (chunk graphs), decodes
        (decode graphs), each kind alone or beside the others as one replay after another (their
        sequences, and so the KV slots they write and read, are disjoint). Other steps run eagerly."""
        if self.graphs is None or not batch.seqs:
            return None, None
        fresh = [start == 0 for start in batch.starts]
        decode = [n == 1 and not f for n, f in zip(batch.num_new_tokens, fresh)]
        prompts = [i for i, f in enumerate(fresh) if f]
        decodes = [i for i, d in enumerate(decode) if d]
        chunks = [i for i, (f, d) in enumerate(zip(fresh, decode)) if not f and not d]
        if prompts and not self.prompts.supports(len(prompts), max(batch.num_new_tokens[i] for i in prompts)):
            return None, None
        if chunks and (self.chunks is None or not self.chunks.supports(
                len(chunks), max(batch.num_new_tokens[i] for i in chunks), max(len(batch.tables[i]) for i in chunks))):
            return None, None
        if decodes and not self.graphs.supports(len(decodes), max(len(batch.tables[i]) for i in decodes)):
            return None, None
        groups = [(rows, run) for rows, run in ((prompts, self._run_prompts), (chunks, self._run_chunks),
                                                (decodes, self._run_decodes)) if rows]
        if len(groups) == 1:
            return groups[0][1](batch)
        parts = []
        for rows, run in groups:
            hidden, sample_rows = run(batch.subset(rows))
            if hidden is None:  # the eager step then rewrites the same KV, harmlessly
                return None, None
            parts.append(hidden.index_select(0, sample_rows))
        self.split_steps += 1
        # the sampled rows: each group's in batch order, group after group; back to batch order
        sampled = [i for i, f in enumerate(batch.sample_flags) if f]
        source = [i for rows, _ in groups for i in rows if batch.sample_flags[i]]
        at = {i: k for k, i in enumerate(source)}
        return torch.cat(parts), self._to_device([at[i] for i in sampled], torch.int64)

    def _launch(self, batch: ScheduledBatch, ready: Callable[[], None] | None) -> "Launched":
        spans = prompt_logprob_spans(batch)
        drafted = any(batch.drafts)
        # prompt logprobs and drafts to verify: eager
        hidden, sample_rows = self._graphed(batch) if not spans and not drafted else (None, None)
        graphed = hidden is not None
        if not graphed:
            if ready is not None:
                ready()
            input_ids, positions, attn, sample_rows = self.prepare(batch)
            hidden = self.model.forward(input_ids, positions, attn)
        # the sequence of each sampled row: a drafted decode's once per position
        sampling = [s for s, f, d in zip(batch.seqs, batch.sample_flags, batch.drafts) if f for _ in range(1 + len(d))]
        tokens, logprobs = self._sample(hidden.index_select(0, sample_rows), sampling) if sampling else (None, None)
        return Launched(tokens, logprobs, graphed=graphed, decode_graph=graphed and batch.decode_only,
                        prompt_logprobs=self._prompt_logprobs(hidden, batch, spans) if spans else None,
                        prompt_spans=spans)

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: ScheduledBatch, spans: list) -> torch.Tensor:
        """Sampler.logprobs rows of the spans' prompt positions (the next prompt token's log-probability and the
        top k), one after another in span order; hidden is the eager step's, its rows the chunks back to back."""
        offsets, at = [], 0
        for n in batch.num_new_tokens:
            offsets.append(at)
            at += n
        rows, targets = [], []
        for i, seq, first, count in spans:
            base = offsets[i] + first - batch.starts[i]
            rows += range(base, base + count)
            targets += seq.token_ids[first + 1:first + 1 + count]
        logits = self.model.compute_logits(hidden.index_select(0, self._to_device(rows, torch.int64)))
        k = max(seq.params.prompt_logprobs for _, seq, _, _ in spans)
        return self.sampler.logprobs(logits, self._to_device(targets, torch.int64), k)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A pinned host copy of t queued behind the work on the device (None stays None)."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class Launched:
    """A step queued on the device. Its sampled ids are copied to pinned host memory behind it, with
    an event, so that result() waits for this step alone and not for a step queued after it."""

    def __init__(self, tokens: torch.Tensor | None, logprobs: torch.Tensor | None, graphed: bool, decode_graph: bool,
                 prompt_logprobs: torch.Tensor | None = None, prompt_spans: list | None = None,
                 deferred: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None):
        self.tokens = tokens  # [N] one per sampling sequence, in batch order; None when none samples
        self.logprobs = logprobs  # [N, 1 + 2k] Sampler.logprobs rows when a sequence asked for them
        self.prompt_logprobs = prompt_logprobs  # the same for prompt_spans' positions, one after another
        self.prompt_spans = prompt_spans or []  # prompt_logprob_spans of the step
        self.graphed = graphed  # replayed CUDA graphs (or their padded eager twin)
        self.decode_graph = decode_graph  # decode-only, through the decode graphs: the next decode may queue behind it
        self.deferred = deferred  # the sampling still to queue (ModelRunner.complete), which gives tokens and logprobs
        self._host = self._host_logprobs = self._host_prompt = self._event = None
        if deferred is None:
            self._copy_back()

    def complete(self) -> None:
        """Queue the deferred sampling (call through ModelRunner.complete)."""
        if self.deferred is not None:
            self.tokens, self.logprobs = self.deferred()
            self.deferred = None
            self._copy_back()

    def _copy_back(self) -> None:
        if any(t is not None and t.is_cuda for t in (self.tokens, self.prompt_logprobs)):
            self._host, self._host_logprobs, self._host_prompt = map(
                _to_host, (self.tokens, self.logprobs, self.prompt_logprobs))
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> list[int]:
        """The sampled ids on the host: the step's one wait for the device (GIL released)."""
        assert self.deferred is None, "a look-ahead step's sampling was not queued (ModelRunner.complete)"
        if self._event is not None:
            self._event.synchronize()
        if self.tokens is None:
            return []
        return self.tokens.tolist() if self._host is None else self._host.tolist()

    def prompt_logprob_rows(self) -> list[list[float]] | None:
        """The prompt logprobs rows on the host, in prompt_spans' order (call after result())."""
        if self.prompt_logprobs is None:
            return None
        return (self.prompt_logprobs if self._host_prompt is None else self._host_prompt).tolist()

    def logprob_rows(self) -> list[list[float]] | None:
        """The Sampler.logprobs rows on the host, in the order of result()'s ids (call after result())."""
        if self.logprobs is None:
            return None
        return (self.logprobs if self._host_logprobs is None else self._host_logprobs).tolist()
