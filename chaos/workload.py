"""The steady load of a chaos run: deterministic prompts, and their fault-free greedy outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Workload:
    """What the load generator sends; request i uses prompt i % num_prompts."""

    requests: int = 200  # at least this many are sent (more if the faults are not all done yet)
    concurrency: int = 8  # requests kept in flight (closed loop)
    max_tokens: int = 16
    num_prompts: int = 24
    min_prompt_tokens: int = 3
    max_prompt_tokens: int = 40
    # Every other prompt begins with one prefix of this many tokens (a system prompt), so the engine's prefix cache
    # shares KV blocks between requests while the faults strike.
    shared_prefix_tokens: int = 32
    deadline_s: float = 300.0  # each request's own gRPC deadline; generous, so an expiry means a hang
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "max_tokens", "num_prompts", "min_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"Workload.{name} must be >= 1, got {getattr(self, name)}")
        if self.shared_prefix_tokens < 0:
            raise ValueError(f"Workload.shared_prefix_tokens must be >= 0, got {self.shared_prefix_tokens}")
        if self.max_prompt_tokens < self.min_prompt_tokens:
            raise ValueError(f"Workload.max_prompt_tokens must be >= min_prompt_tokens ({self.min_prompt_tokens}), "
                             f"got {self.max_prompt_tokens}")
        if self.deadline_s <= 0:
            raise ValueError(f"Workload.deadline_s must be > 0, got {self.deadline_s}")

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """The distinct prompts, varied in length, the same for every run with this seed; the odd ones begin with
        the shared prefix."""
        gen = torch.Generator().manual_seed(self.seed)
        span = self.max_prompt_tokens - self.min_prompt_tokens + 1
        out = []
        for _ in range(self.num_prompts):
            n = self.min_prompt_tokens + int(torch.randint(0, span, (1,), generator=gen))
            out.append(torch.randint(0, vocab_size, (n,), generator=gen).tolist())
        prefix = torch.randint(0, vocab_size, (self.shared_prefix_tokens,), generator=gen).tolist()
        return [prefix + p if i % 2 else p for i, p in enumerate(out)]

    @staticmethod
    def sampling(prompt_index: int) -> dict:
        """What request i adds to greedy decoding, by its prompt: every fourth from the second penalises repeats
        (its rows read their history on the device, queued ahead), every fourth from the fourth biases two tokens."""
        if prompt_index % 4 == 1:
            return {"presence_penalty": 0.5, "repetition_penalty": 1.2}
        if prompt_index % 4 == 3:
            return {"logit_bias": {7: 4.0, 11: -2.0}}
        return {}


def reference_outputs(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy completions of `prompts` (with Workload.sampling's extras) from an undisturbed single-process engine
    (experts in-process)."""
    from moeserve.router.config import EngineConfig
    from moeserve.router.llm_engine import LLMEngine
    from moeserve.router.sequence import SamplingParams

    engine = LLMEngine.from_config(EngineConfig(model=model_dir, max_num_seqs=len(prompts), num_kv_blocks=256))
    params = [SamplingParams(max_tokens=max_tokens, ignore_eos=True, **Workload.sampling(i)) for i in range(len(prompts))]
    outs = engine.generate_batch(prompts, params)
    return [o.new_token_ids for o in outs]
