"""EngineConfig: the one object that configures the engine, validated once where it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_CPU_KV_BYTES = 256 * 1024 * 1024


def _require(ok: bool, field: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"EngineConfig.{field} must be {allowed}, got {value!r}")


def _int_in(field: str, value: Any, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    _require(ok, field, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]", value)


@dataclass(slots=True)
class EngineConfig:
    """How the engine loads its model, sizes its KV cache and batches requests."""

    model: str | None = None  # HF-format checkpoint dir; None = the built-in demo model
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on CUDA) or a name in _DTYPES
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # sequences in one step (and running at once)
    max_num_batched_tokens: int = 2048  # tokens in one step: decodes plus prefill chunks
    max_model_len: int | None = None  # prompt + completion; None = the model's context length
    kv_cache_memory_bytes: int | None = None  # KV budget; None = 256 MiB on CPU, a fraction of free GPU memory on CUDA
    gpu_memory_fraction: float = 0.9  # share of free GPU memory the engine may take (weights already loaded)
    num_kv_blocks: int | None = None  # exact block count, overriding the byte budget (tests, tuning)
    max_queued_requests: int = 1024  # waiting requests beyond this are refused with QueueFullError
    expert_backend: Callable[[Any], Any] | None = None  # model -> expert backend (e.g. the Ray transport)
    load_experts: bool = True  # load routed-expert weights into this process (False when a backend holds them)
    seed: int = 0  # seeds the generator of requests that give no seed of their own
    # Decode-only steps: "auto" replays captured CUDA graphs on a GPU when the experts run in this
    # process (eager otherwise), "off" always runs eagerly (`moeserve serve --enforce-eager`), and
    # "padded" runs the graphs' fixed-shape padded step eagerly on any device (how CPU tests check it).
    decode_graphs: str = "auto"
    graph_capture_tokens: int = 2048  # decode graphs captured at start-up for contexts up to this (0: on first use)
    # Prompt steps (first chunks; chunks after a cached prefix) run as graphs up to this many padded tokens,
    # larger ones eagerly: a step of thousands of tokens keeps the GPU busy while Python launches its kernels,
    # and padding it to a shape adds work (router/cuda_graphs.py). 0: prompt steps always eager.
    prompt_graph_tokens: int = 4096
    # A step about to prefill requests that are still arriving (one within the last millisecond)
    # waits for the rest of the burst, at most this long after the first of them (0: never waits).
    batch_wait_ms: float = 20.0
    # Prompts arriving while decodes run wait for a prefill step of their own, at most this long after
    # the first of them, so that more of the decode steps in between are decodes alone (router/scheduler.py;
    # only where decode graphs run). 0 (the default): a prompt joins the next step. A hold trades TTFT
    # for TPOT under steady arrivals (docs/benchmarks.md).
    prefill_hold_ms: float = 0.0
    # Where decode steps replay graphs, queue each decode step on the device before the previous
    # step's tokens are back on the host, so the GPU does not wait for the host's bookkeeping
    # (LLMEngine.step; `moeserve serve --no-overlap-decode` turns it off).
    overlap_decode: bool = True
    # Reuse the KV of whole blocks a prompt shares with earlier requests (router/block_manager.py);
    # `moeserve serve --no-prefix-caching` turns it off, e.g. where tenants must not learn from TTFT
    # whether another sent the same prefix.
    prefix_caching: bool = True
    # Speculative decoding by prompt lookup (router/speculative.py): a request's decode (greedy, or sampled without
    # a seed of its own) drafts up to this many tokens, copied from what followed the last earlier occurrence of its
    # newest ngram_max..ngram_min tokens (in its prompt or output), and one step verifies them all: the tokens
    # (greedy) or the distribution (sampled) of one-at-a-time decoding. 0 (the default): off.
    speculative_tokens: int = 0
    ngram_min: int = 2
    ngram_max: int = 4

    def __post_init__(self) -> None:
        _require(self.model is None or (isinstance(self.model, str) and self.model != ""), "model", "a checkpoint directory or None", self.model)
        _require(
            isinstance(self.device, str) and (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")),
            "device", "'cpu', 'cuda' or 'cuda:N'", self.device,
        )
        _require(self.dtype == "auto" or self.dtype in _DTYPES, "dtype", f"'auto' or one of {sorted(_DTYPES)}", self.dtype)
        _int_in("block_size", self.block_size, 1, 1024)
        _int_in("max_num_seqs", self.max_num_seqs, 1, 65536)
        _int_in("max_num_batched_tokens", self.max_num_batched_tokens, self.max_num_seqs)
        if self.max_model_len is not None:
            _int_in("max_model_len", self.max_model_len, 2)
        if self.kv_cache_memory_bytes is not None:
            _int_in("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1)
        _require(
            isinstance(self.gpu_memory_fraction, (int, float)) and 0.0 < self.gpu_memory_fraction <= 1.0,
            "gpu_memory_fraction", "in (0, 1]", self.gpu_memory_fraction,
        )
        if self.num_kv_blocks is not None:
            _int_in("num_kv_blocks", self.num_kv_blocks, 1)
        _int_in("max_queued_requests", self.max_queued_requests, 1)
        _require(self.expert_backend is None or callable(self.expert_backend), "expert_backend", "callable or None", self.expert_backend)
        _int_in("seed", self.seed, 0)
        _require(self.decode_graphs in ("auto", "off", "padded"), "decode_graphs", "'auto', 'off' or 'padded'",
                 self.decode_graphs)
        _int_in("graph_capture_tokens", self.graph_capture_tokens, 0)
        _int_in("prompt_graph_tokens", self.prompt_graph_tokens, 0)
        _require(isinstance(self.batch_wait_ms, (int, float)) and not isinstance(self.batch_wait_ms, bool)
                 and 0.0 <= self.batch_wait_ms <= 1000.0, "batch_wait_ms", "a number of milliseconds in [0, 1000]",
                 self.batch_wait_ms)
        _require(isinstance(self.overlap_decode, bool), "overlap_decode", "True or False", self.overlap_decode)
        _require(isinstance(self.prefix_caching, bool), "prefix_caching", "True or False", self.prefix_caching)
        _int_in("speculative_tokens", self.speculative_tokens, 0, 64)
        _int_in("ngram_min", self.ngram_min, 1, 64)
        _int_in("ngram_max", self.ngram_max, self.ngram_min, 64)
        _require(isinstance(self.prefill_hold_ms, (int, float)) and not isinstance(self.prefill_hold_ms, bool)
                 and 0.0 <= self.prefill_hold_ms <= 10000.0, "prefill_hold_ms",
                 "a number of milliseconds in [0, 10000]", self.prefill_hold_ms)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)
