"""Decode steps (DecodeGraphs) and prompts' first chunks (PromptGraphs) replayed from captured CUDA
graphs; _Graphs holds what both share (capture, replay, input staging, the eager `capture=False` mode).

An eager decode step launches some twenty kernels per layer from Python; at batch 1 on a GPU the
launches, not the weights, set the step time. A decode-only step has a shape fixed by two numbers,
the batch size and the longest context, so each step is padded up to a bucket of both and replays
the graph captured for that bucket:

- batch buckets: 1, 2, 4, 8, then multiples of 8 up to max_num_seqs;
- context buckets: a power-of-two number of KV blocks (at least 8) up to the longest table.

Padding rows read token 0 at position 0, write their KV to a scratch block the block manager never
hands out, attend to that one slot, and are dropped before sampling. Padding keys of real rows are
masked, so the padded step computes each real row exactly as the eager batched decode does.

The buckets for contexts up to EngineConfig.graph_capture_tokens are captured at start-up (padding
rows only); others the first time they are needed (a warm-up forward, then the capture, on the
engine's thread). All share one memory pool. With `capture=False` the same padded, fixed-shape step
runs eagerly: that is how the CPU test suite checks everything here but the capture itself.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from moeserve.kernels import ops
from moeserve.models.batch import AttentionBatch
from moeserve.models.layers import decode_attention

log = logging.getLogger(__name__)

MIN_CONTEXT_BLOCKS = 8


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, 16, 24, ... up to and including max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


def context_bucket(blocks: int, max_blocks: int, smallest: int = MIN_CONTEXT_BLOCKS) -> int:
    """The padded block-table width for a step whose longest sequence holds `blocks` blocks: a power of two
    times `smallest`, within max_blocks."""
    width = smallest
    while width < blocks:
        width *= 2
    return min(width, max_blocks)


class _Graphs(ABC):
    """Captured CUDA graphs of fixed-shape steps, keyed by shape, sharing one memory pool and one
    capture stream: what decode and prompt graphs have in common."""

    kind = "step"

    def __init__(self, model: Any, device: torch.device, capture: bool):
        self.model = model
        self.device = device
        self.capture = capture
        self._graphs: dict[Any, tuple[Any, torch.Tensor]] = {}
        self._pool = None
        self.failed: str | None = None  # why capture was given up (then every step runs eagerly)
        self._refused: set[Any] = set()  # shapes whose capture ran out of memory
        self._stream: Any = None  # this object's capture stream, on its own device
        self._stage: torch.Tensor | None = None  # pinned host staging of a step's int64 inputs (subclasses size it)
        self._stage32: torch.Tensor | None = None  # and of its int32 ones, where a subclass has some
        self._staged: Any = None  # CUDA event after the last step's copies out of the stages

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def describe(self) -> str:
        """One line for logs and benchmark reports: how many graphs, and what failed."""
        text = f"{self.captured} {self.kind} graphs captured"
        if self._refused:
            text += f", {len(self._refused)} shapes refused for memory"
        return text + (f", capture FAILED ({self.failed}): {self.kind} steps run eagerly" if self.failed else "")

    def _upload(self, data: list[int], buffers: list[torch.Tensor]) -> None:
        """The step's host integers into the static buffers, through the pinned stage of each buffer's dtype
        (int64, int32: a copy that converted on the way would go through pageable memory): each buffer takes the
        next numel() values, one host-to-device copy each."""
        if self._staged is not None:  # the previous step's copies may still be reading the pinned stages
            self._staged.synchronize()
        host = torch.tensor(data, dtype=torch.int64)
        nb = self.device.type == "cuda"
        at, used = 0, {torch.int64: 0, torch.int32: 0}
        for buf in buffers:
            n, start = buf.numel(), used[buf.dtype]
            piece = (self._stage if buf.dtype == torch.int64 else self._stage32)[start:start + n]
            piece.copy_(host[at:at + n])
            buf.copy_(piece.view(buf.shape), non_blocking=nb)
            used[buf.dtype], at = start + n, at + n
        if nb:
            self._staged = torch.cuda.Event()
            self._staged.record()

    @abstractmethod
    def _forward(self, *key: int) -> torch.Tensor:
        """The model's fixed-shape step of this shape over the static buffers."""

    @abstractmethod
    def _load_padding(self, key: Any) -> None:
        """Static buffers holding padding rows only, for a capture ahead of use."""

    def _run_shape(self, key: Any) -> torch.Tensor | None:
        """The step of this shape over the loaded buffers: eagerly without capture, else replayed from
        its graph (captured now if new); None when it cannot be captured."""
        if not self.capture:
            return self._forward(*key)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, lambda: self._forward(*key))
            if entry is None:
                return None
        graph, out = entry
        graph.replay()
        return out

    def _capture_all(self, keys: list[Any]) -> int:
        """Capture these shapes now, so serving does not stall on a first use; the number captured.
        Padding rows only: they write nothing but the scratch block."""
        if not self.capture:
            return 0
        count = 0
        for key in keys:
            if key in self._graphs:
                continue
            self._load_padding(key)
            entry = self._capture(key, lambda key=key: self._forward(*key))
            if entry is not None:
                # Replayed once now: a graph's first launch also uploads it to the device, which took the
                # first 4096-token prompt served on an H100 98.6 ms against 64-65 for the replays after it.
                entry[0].replay()
                count += 1
            elif self.failed is not None:
                break
        if count:
            torch.cuda.synchronize(self.device)
        return count

    def _capture(self, key: Any, forward: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor] | None:
        try:
            with torch.cuda.device(self.device):
                forward()  # warm-up: Triton compiles, caches fill, outside the capture
                torch.cuda.synchronize(self.device)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                    # Our own capture stream on our device: torch.cuda.graph's default one is made once per
                    # process, on whichever device was current at the first capture anywhere.
                    self._stream = torch.cuda.Stream(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.stream(self._stream):  # restored here even if ending the capture fails
                    with torch.cuda.graph(graph, pool=self._pool, stream=self._stream,
                                          capture_error_mode="thread_local"):
                        out = forward()
        except torch.cuda.OutOfMemoryError as exc:  # this shape only: smaller ones may still fit
            self._refused.add(key)
            torch.cuda.empty_cache()
            log.warning("no memory to capture the %s graph %s (%s); such steps run unpadded, eagerly",
                        self.kind, key, exc)
            return None
        except Exception as exc:  # noqa: BLE001 -- a capture failure must not take serving down
            self.failed = f"{type(exc).__name__}: {exc}"
            log.error("CUDA graph capture failed for the %s graph %s; %s steps run eagerly from now on",
                      self.kind, key, self.kind, exc_info=True)
            self._graphs.clear()
            return None
        log.info("captured the %s graph %s", self.kind, key)
        self._graphs[key] = (graph, out)
        return graph, out


class DecodeGraphs(_Graphs):
    """Fixed-shape decode steps over static input buffers; on CUDA, captured once per bucket and replayed."""

    kind = "decode"

    def __init__(self, model: Any, device: torch.device, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, pad_block: int, capture: bool):
        super().__init__(model, device, capture)
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.pad_block = pad_block
        self.buckets = batch_buckets(max_num_seqs)
        n, w = self.buckets[-1], max_blocks_per_seq
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, w, dtype=torch.int64, device=device)
        # host staging, one pinned buffer per step: [ids | positions | slots | lens | tables], b rows each
        self._stage = torch.zeros(n * (4 + w), dtype=torch.int64, pin_memory=device.type == "cuda")
        self.steps = 0  # decode steps run through here
        self._widest_cache: torch.Tensor | None = None

    def bucket(self, num_seqs: int) -> int | None:
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def supports(self, num_seqs: int, blocks: int) -> bool:
        """Whether a decode step of num_seqs sequences, the longest holding `blocks` blocks, runs here:
        within the batch buckets and, where decode attention gathers contexts into padded tensors (not
        the in-place kernel of a GPU), with every layer's padded gather within MAX_GATHER_BYTES."""
        b = self.bucket(num_seqs)
        if self.failed is not None or b is None:
            return False
        width = context_bucket(blocks, self.max_blocks)
        if (b, width) in self._refused:
            return False
        if ops.decode_attention_in_place(self.device):
            return True
        if self._widest_cache is None:  # the caches are allocated after this object is built
            self._widest_cache = max(self.model.kv_caches(), key=lambda c: c[0, 0].numel() * c.element_size())
        return (decode_attention.gather_bytes(b, width * self.block_size, self._widest_cache)
                <= decode_attention.MAX_GATHER_BYTES)

    def run(self, input_ids: list[int], positions: list[int], slot_mapping: list[int], context_lens: list[int],
            block_tables: list[list[int]], input_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Hidden states [B, H] of a decode-only step (one token per sequence, B <= max_num_seqs), or
        None when its graph could not be captured (the caller runs the step its usual, unpadded way).
        `input_tokens` [B], on the device, replaces input_ids: a step queued before the ids it reads
        reach the host (they are copied in stream order, after the step that samples them)."""
        num = len(input_ids)
        b = self.bucket(num)
        if b is None:
            raise ValueError(f"a decode step of {num} sequences is beyond the largest graph bucket {self.buckets[-1]}")
        width = context_bucket(max(len(t) for t in block_tables), self.max_blocks)
        self._load(num, b, input_ids, positions, slot_mapping, context_lens, block_tables, width)
        if input_tokens is not None:
            self.input_ids[:num].copy_(input_tokens)
        self.steps += 1
        out = self._run_shape((b, width))
        return None if out is None else out[:num]  # None: no graph, the step runs unpadded

    def plan_ahead(self, max_tokens: int) -> list[tuple[int, int]]:
        """The (batch bucket, context blocks) pairs to capture at start-up for contexts up to max_tokens:
        every batch bucket, widest contexts and largest batches first (later, smaller captures reuse
        the memory pool), leaving out shapes beyond the gather bound."""
        if max_tokens <= 0:
            return []
        wanted = min(self.max_blocks, -(-max_tokens // self.block_size))
        widths, w = [], MIN_CONTEXT_BLOCKS
        while True:
            widths.append(min(w, self.max_blocks))
            if w >= wanted:
                break
            w *= 2
        return [(b, width) for width in sorted(set(widths), reverse=True) for b in reversed(self.buckets)
                if self.supports(b, width)]

    def capture_ahead(self, max_tokens: int) -> int:
        """Capture plan_ahead(max_tokens) now; the number captured."""
        return self._capture_all(self.plan_ahead(max_tokens))

    def _load_padding(self, key: tuple[int, int]) -> None:
        b, width = key
        self._load(0, b, [], [], [], [], [], width)

    def _load(self, num, b, input_ids, positions, slot_mapping, context_lens, block_tables, width) -> None:
        """Write the step and its padding rows into the static buffers: one staged host-to-device copy each."""
        pad = b - num
        data = (input_ids + [0] * pad) + (positions + [0] * pad)
        data += slot_mapping + [self.pad_block * self.block_size] * pad
        data += context_lens + [1] * pad
        for t in block_tables:
            data += t[:width] + [0] * (width - len(t))
        data += ([self.pad_block] + [0] * (width - 1)) * pad
        self._upload(data, [self.input_ids[:b], self.positions[:b], self.slot_mapping[:b], self.context_lens[:b],
                            self.block_tables[:b, :width]])

    def _batch(self, b: int, width: int) -> AttentionBatch:
        # A new AttentionBatch each time: the attention layers memoise per-step tensors on it, and a
        # capture must record computing them, not reuse ones from the warm-up.
        padded = width * self.block_size
        return AttentionBatch(
            query_lens=[1] * b, context_lens=[padded] * b, block_tables=self.block_tables[:b, :width],
            slot_mapping=self.slot_mapping[:b], block_size=self.block_size, padded_len=padded,
            context_lens_tensor=self.context_lens[:b],
        )

    def _forward(self, b: int, width: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:b], self.positions[:b], self._batch(b, width))


PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # padded prompt lengths
# The largest padded step (sequences x length) captured is EngineConfig.prompt_graph_tokens. Graphs pay where
# launching is the step's cost; a step of thousands of tokens keeps the GPU busy while Python launches, and
# padding it to a shape adds work: on an H200 (fifth session), graphing 16 x 256-token prompts (4096 tokens)
# lowered Qwen3's served tokens/s at concurrency 16 by 6% and raised its TTFT p50 from 89 to 125 ms
# (docs/benchmarks.md). Since then the eager step became the slower one where the host is slow: on an H100
# (twenty-third session) the same step took 64-65 ms replayed, and graphing it raised concurrency 16 from 964.3
# to 1000.3 tok/s (Qwen3) and from 1419.9 to 1473.2 (DeepSeek-V2-Lite), TTFT p50 118 -> 79 and 86 -> 59 ms; on a
# faster host (twenty-second session) it changed nothing (991.3 / 1472.2 against 997.6 / 1472.7). So the
# default is 4096 tokens (issue 3's table with it, prompts drawn per level: docs/benchmarks.md, twenty-fourth
# session).


class PromptGraphs(_Graphs):
    """Whole prompts in fixed-shape steps: a step whose every sequence is at its first chunk (nothing
    of it cached yet) pads each sequence at its end to one length of PROMPT_BUCKETS, and their number
    to a batch bucket (as decode graphs do), and on CUDA replays the graph captured for that shape.
    An eager prompt step launches its kernels from Python layer by layer: on an H200 a 256-token
    Qwen3-30B-A3B prompt took 43 ms of which the GPU was busy 11.

    Attention takes the batch's `fresh` form (models/batch.py): each sequence causal over its own
    keys, read back from the slots the step wrote, so the shape is (sequences, length) alone. Padding
    rows read token 0, write their KV to the scratch block (as decode padding does) and come after
    every real row of their sequence, so causal attention keeps them out of every real row; they are
    never sampled. Shapes up to max_tokens padded tokens (EngineConfig.prompt_graph_tokens within the step
    budget) are captured at start-up; with `capture=False` the same padded step runs eagerly (the CPU test
    suite's check of everything but the capture)."""

    kind = "prompt"

    def __init__(self, model: Any, device: torch.device, max_num_seqs: int, max_tokens: int, block_size: int,
                 pad_block: int, capture: bool):
        super().__init__(model, device, capture)
        self.block_size = block_size
        self.pad_slot = pad_block * block_size
        self.max_tokens = max_tokens
        self.lengths = [n for n in PROMPT_BUCKETS if n <= self.max_tokens]
        self.batches = batch_buckets(max_num_seqs)
        n = self.max_tokens
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), self.pad_slot, dtype=torch.int64, device=device)
        self._stage = torch.zeros(3 * n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._tables = torch.zeros(1, 1, dtype=torch.int32, device=device)  # not read: keys come by slot
        self.steps = 0  # prompt steps run through here

    def shape(self, num_seqs: int, longest: int) -> tuple[int, int] | None:
        """(sequences, length) of the padded step for num_seqs prompts, the longest of `longest`
        tokens; None when no captured shape holds them."""
        b = next((x for x in self.batches if x >= num_seqs), None)
        n = next((x for x in self.lengths if x >= longest), None)
        if b is None or n is None or b * n > self.max_tokens:
            return None
        return b, n

    def supports(self, num_seqs: int, longest: int, *more: int) -> bool:
        """Whether a step of this shape replays here (`more`: what a subclass's shape also takes)."""
        key = self.shape(num_seqs, longest, *more)
        return self.failed is None and key is not None and key not in self._refused

    def run(self, input_ids: list[list[int]], slot_mapping: list[list[int]]) -> tuple[torch.Tensor, int] | None:
        """(hidden states [b * n, H] of the padded step, n) for the sequences' first chunks (token ids
        and KV slots per sequence): sequence i's token j is row i * n + j. None when the shape's graph
        could not be captured (the caller runs the step its usual way)."""
        key = self.shape(len(input_ids), max(map(len, input_ids)))
        if key is None:
            raise ValueError(f"no prompt graph holds {len(input_ids)} prompts of up to "
                             f"{max(map(len, input_ids))} tokens")
        self._load(key, input_ids, slot_mapping)
        self.steps += 1
        out = self._run_shape(key)
        return None if out is None else (out, key[1])

    def plan_ahead(self) -> list[tuple[int, int]]:
        """Every captured shape, the largest steps first (the smaller ones reuse their pool)."""
        keys = [(b, n) for b in self.batches for n in self.lengths if b * n <= self.max_tokens]
        return sorted(keys, key=lambda k: (-k[0] * k[1], -k[1]))

    def capture_ahead(self) -> int:
        """Capture every shape now; the number captured."""
        return self._capture_all(self.plan_ahead())

    def _load_padding(self, key: tuple[int, int]) -> None:
        self._load(key, [], [])

    def _load(self, key: tuple[int, int], input_ids: list[list[int]], slot_mapping: list[list[int]]) -> None:
        b, n = key
        ids, slots = [], []
        for i in range(b):
            seq_ids = input_ids[i] if i < len(input_ids) else []
            pad = n - len(seq_ids)
            ids += seq_ids + [0] * pad
            slots += (slot_mapping[i] if i < len(input_ids) else []) + [self.pad_slot] * pad
        positions = list(range(n)) * b  # a fresh prompt's are 0, 1, ...
        self._upload(ids + positions + slots,
                     [self.input_ids[:b * n], self.positions[:b * n], self.slot_mapping[:b * n]])

    def _forward(self, b: int, n: int) -> torch.Tensor:
        batch = AttentionBatch(query_lens=[n] * b, context_lens=[n] * b, block_tables=self._tables,
                               slot_mapping=self.slot_mapping[:b * n], block_size=self.block_size, fresh=True)
        return self.model.forward(self.input_ids[:b * n], self.positions[:b * n], batch)


class ChunkGraphs(PromptGraphs):
    """Prompt chunks after a cached prefix (a prefix-cache hit, or a long prompt's later chunk) in
    fixed-shape steps, as PromptGraphs runs first chunks: each chunk padded at its end to a length of
    PROMPT_BUCKETS, their number to a batch bucket. Attention reads each sequence's cached prefix
    through its block table with the prefill attention kernel, whose launch plan (the chunks' and
    contexts' lengths; kernels/prefill_attention.fixed_plan) sits in a device buffer rewritten before
    each replay, so one captured step serves any chunk lengths and any prefixes. Without this a step
    holding such a chunk ran eagerly: on an H100 a step of 15 decodes beside a 16-token chunk after a
    240-token cached prefix took 107-133 ms, against 28 ms for a new prompt's graphed step.

    Only for models whose every layer takes the plan (models/causal_lm.takes_chunk_plans: GQA layers whose
    heads the kernel takes, and MLA). MLA reads each context padded to a fixed number of keys (its latents
    gathered through the block table, masked by the plan's lengths), so its shapes also carry a context width:
    the step's longest block table rounded up to a power of two of blocks, within the padded call's bounds
    (larger steps run eagerly). GQA shapes are captured at start-up, as the prompt graphs' are (a prefix-cache
    hit of a new shape would otherwise hold its step for a warm-up forward and a capture: 150-180 ms at 2-4
    thousand tokens on an H100); MLA's on first use."""

    kind = "chunk"

    def __init__(self, model: Any, device: torch.device, max_num_seqs: int, max_tokens: int, block_size: int,
                 pad_block: int, max_blocks_per_seq: int, capture: bool, share_pool_of: _Graphs | None = None):
        super().__init__(model, device, max_num_seqs, max_tokens, block_size, pad_block, capture)
        from moeserve.kernels import prefill_attention

        # Captured after the prompt graphs, into their memory pool: their steps are no larger, and the
        # two never run at once (a step replays one, copies out what it needs, then the other), so only
        # each graph's output takes new memory beside the KV cache.
        self._share = share_pool_of
        self._plan_of, self._plan_size = prefill_attention.fixed_plan, prefill_attention.fixed_plan_size
        self.max_blocks = max_blocks_per_seq
        most = max((self._plan_size(n, b) for b in self.batches for n in self.lengths if b * n <= self.max_tokens),
                   default=0)
        # int32, as an eager step passes them: the kernel compiled at start-up serves the graphs too
        self.plan = torch.zeros(most, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(self.batches[-1], max_blocks_per_seq, dtype=torch.int32, device=device)
        self._stage32 = torch.zeros(most + self.batches[-1] * max_blocks_per_seq, dtype=torch.int32,
                                    pin_memory=device.type == "cuda")
        pads = getattr(model, "pads_chunk_contexts", None)
        self.pads_contexts = pads is not None and pads()

    def shape(self, num_seqs: int, longest: int, blocks: int = 1) -> tuple[int, ...] | None:
        """(sequences, length) of the padded step, and for a model that pads contexts (MLA) the blocks each
        context is read padded to; None when no shape holds them."""
        key = super().shape(num_seqs, longest)
        if key is None or blocks > self.max_blocks:
            return None
        if not self.pads_contexts:
            return key
        width = context_bucket(blocks, self.max_blocks, smallest=1)
        if not self.model.chunk_context_fits(key[0], key[1], width * self.block_size):
            return None
        return (*key, width)

    def run(self, input_ids: list[list[int]], slot_mapping: list[list[int]], starts: list[int] | None = None,
            tables: list[list[int]] | None = None) -> tuple[torch.Tensor, int] | None:
        """(hidden states [b * n, H] of the padded step, n) for chunks whose sequence i has starts[i] tokens
        cached before it and the block table tables[i]; row i * n + j is its chunk's token j. None when the
        shape's graph could not be captured."""
        if starts is None or tables is None:
            raise ValueError("a chunk step needs each sequence's cached length and block table")
        key = self.shape(len(input_ids), max(map(len, input_ids)), max(map(len, tables)))
        if key is None:
            raise ValueError(f"no chunk graph holds {len(input_ids)} chunks of up to {max(map(len, input_ids))} tokens "
                             f"over up to {max(map(len, tables))} blocks")
        self._load_chunks(key, input_ids, slot_mapping, starts, tables)
        self.steps += 1
        out = self._run_shape(key)
        return None if out is None else (out, key[1])

    def plan_ahead(self) -> list[tuple[int, ...]]:
        """The shapes captured at start-up: the prompt graphs' (sequences, length); none for a model that pads
        contexts (MLA), whose shapes also carry a context width: those are captured on first use."""
        return [] if self.pads_contexts else super().plan_ahead()

    def _load_padding(self, key: tuple[int, ...]) -> None:
        self._load_chunks(key, [], [], [], [])

    def _capture(self, key: Any, forward: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor] | None:
        if self._pool is None and self._share is not None and self._share._pool is not None:
            self._pool, self._stream = self._share._pool, self._share._stream
        return super()._capture(key, forward)

    def _load_chunks(self, key: tuple[int, ...], input_ids: list[list[int]], slot_mapping: list[list[int]],
                     starts: list[int], tables: list[list[int]]) -> None:
        b, n = key[:2]
        ids, positions, slots = [], [], []
        for i in range(b):
            chunk = input_ids[i] if i < len(input_ids) else []
            pad = n - len(chunk)
            ids += chunk + [0] * pad
            positions += (list(range(starts[i], starts[i] + len(chunk))) if chunk else []) + [0] * pad
            slots += (slot_mapping[i] if chunk else []) + [self.pad_slot] * pad
        lens = [len(c) for c in input_ids]
        plan = self._plan_of(n, lens, [s + q for s, q in zip(starts, lens)], b)
        width = max([1] + [len(t) for t in tables])
        rows = [t + [0] * (width - len(t)) for t in tables] + [[0] * width] * (b - len(tables))
        self._upload(ids + positions + slots + plan + [x for row in rows for x in row],
                     [self.input_ids[:b * n], self.positions[:b * n], self.slot_mapping[:b * n],
                      self.plan[:len(plan)], self.block_tables[:b, :width]])

    def _forward(self, b: int, n: int, width: int | None = None) -> torch.Tensor:
        """width: the blocks each context is read padded to (a model that pads contexts), else every column of
        the tables is there for the kernel, which reads a sequence's own blocks."""
        plan = self.plan[:self._plan_size(n, b)]
        batch = AttentionBatch(query_lens=[n] * b, context_lens=[n] * b,
                               block_tables=self.block_tables[:b, :width] if width else self.block_tables[:b],
                               slot_mapping=self.slot_mapping[:b * n], block_size=self.block_size, chunk_plan=plan,
                               padded_len=width * self.block_size if width else None)
        return self.model.forward(self.input_ids[:b * n], self.positions[:b * n], batch)
