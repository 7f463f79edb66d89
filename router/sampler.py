"""Next-token sampling for a batch of rows: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Whole-batch tensor ops; the only Python loop is over seeded rows (one noise draw each, from the
request's own generator), so a seeded request's tokens do not depend on its batch companions.
Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) draws from p exactly.
"""

from __future__ import annotations

import torch

from .sequence import SamplingParams
from .structured import apply_grammar


class Sampler:
    """Picks one token per row of logits; unseeded rows draw from the engine's own generator."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def advance(self, generator: torch.Generator, tokens: int, vocab: int) -> None:
        """Move a request's generator past `tokens` sampled tokens: each sample draws one row of `vocab`
        exponentials from it (__call__), so these draws leave it where those samples left it."""
        for _ in range(tokens):
            torch.empty(vocab, device=self.device).exponential_(generator=generator)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None], histories: list | None = None,
                 grammars: list | None = None, pending: torch.Tensor | None = None) -> torch.Tensor:
        """logits [N, V] float32 -> token ids [N] int64 (on the logits' device). `histories`: where a row's params
        read the tokens so far (penalties, min_tokens), its (token ids so far, prompt length, ids min_tokens
        holds back), else None; see apply_history (and its `pending`). `grammars`: a row's structured-output matcher,
        else None. Logit biases come first, then the history, as in HF generate, then the grammar's mask."""
        logits = apply_logit_bias(logits, params)
        if histories is not None:
            logits = apply_history(logits, params, histories, pending)
        if grammars is not None:
            logits = apply_grammar(logits, grammars)
        greedy_ids = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy_ids
        n, vocab = logits.shape
        dev = logits.device
        temps = _small([p.temperature if not p.greedy else 1.0 for p in params], logits.dtype, dev)
        scaled = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params if not p.greedy):
            scaled = _top_k_top_p(scaled, params, vocab)
        if any(p.min_p > 0.0 for p in params if not p.greedy):
            scaled = _min_p(scaled, params)
        probs = torch.softmax(scaled, dim=-1)
        q = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if len(unseeded) == n:
            q.exponential_(generator=self.generator)
        else:
            if unseeded:
                idx = _small(unseeded, torch.int64, dev)
                q[idx] = torch.empty((len(unseeded), vocab), device=dev, dtype=q.dtype).exponential_(generator=self.generator)
            for i, g in enumerate(generators):
                if g is not None:
                    q[i].exponential_(generator=g)
        sampled = (probs / q.clamp_min_(1e-20)).argmax(dim=-1)
        greedy = _small([p.greedy for p in params], torch.bool, dev)
        return torch.where(greedy, greedy_ids, sampled)


    @torch.inference_mode()
    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """[N, 1 + 2k] float32: each row's log-probability of its token under the model (log-softmax of the raw
        logits: before temperature, top-k and top-p), then the k largest log-probabilities, then their token ids
        (as floats: exact below 2**24)."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        parts = [lp.gather(1, tokens.unsqueeze(1))]
        if k:
            top = lp.topk(k, dim=-1)
            parts += [top.values, top.indices.float()]
        return torch.cat(parts, dim=1)


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The logits with each row's logit_bias added (a new tensor; the same one when no row has any): one upload of
    (flat index, bias) pairs for the whole batch."""
    if not any(p.logit_bias for p in params):
        return logits
    vocab = logits.shape[1]
    flat = [i * vocab + token for i, p in enumerate(params) for token, _ in p.logit_bias]
    values = [bias for p in params for _, bias in p.logit_bias]
    out = logits.clone()
    out.view(-1).index_add_(0, _small(flat, torch.int64, logits.device), _small(values, logits.dtype, logits.device))
    return out


def apply_history(logits: torch.Tensor, params: list[SamplingParams], histories: list,
                  pending: torch.Tensor | None = None) -> torch.Tensor:
    """The logits with each row's penalties on the tokens so far and its min_tokens mask applied (a new tensor;
    the same one when no row has any). The rows that ask are done together on the device: one upload of their
    token indices, then whole-tensor ops, so only they pay.

    repetition_penalty is HF transformers' RepetitionPenaltyLogitsProcessor over prompt and output; presence and
    frequency penalties are OpenAI's, over the output; min_tokens masks the held-back ids (EOS, stop ids) to -inf
    while fewer new tokens than it were generated. `pending`: [N] token ids on the device that each row generated
    after its history (a decode step queued ahead samples before the previous step's tokens reach the host); they
    count as the history's last token."""
    rows = [i for i, h in enumerate(histories) if h is not None]
    if not rows:
        return logits
    dev, vocab, n = logits.device, logits.shape[1], len(rows)
    seen_at: list[int] = []  # flat indices into [n, vocab]: tokens the repetition penalty acts on
    generated_at: list[int] = []  # one per generated token (with repeats): presence and frequency counts
    held_at: list[int] = []  # ids min_tokens holds back
    rep, presence, frequency = [], [], []
    for j, i in enumerate(rows):
        p = params[i]
        tokens, num_prompt, held_back = histories[i]
        base = j * vocab
        if p.repetition_penalty != 1.0:
            seen_at += [base + t for t in set(tokens)]
        if p.presence_penalty or p.frequency_penalty:
            generated_at += [base + t for t in tokens[num_prompt:]]
        if len(tokens) - num_prompt + (pending is not None) < p.min_tokens and held_back:
            held_at += [base + t for t in held_back]
        rep.append(p.repetition_penalty)
        presence.append(p.presence_penalty)
        frequency.append(p.frequency_penalty)
    # two uploads for the whole step (each a pinned copy on CUDA), then only scatters: no op that synchronises
    ints = _small(rows + seen_at + generated_at + held_at, torch.int64, dev)
    index, seen_at_t, generated_at_t, held_at_t = ints.split([n, len(seen_at), len(generated_at), len(held_at)])
    floats = _small(rep + presence + frequency, logits.dtype, dev).view(3, n, 1)
    whole = n == logits.shape[0]
    sub = logits.clone() if whole else logits.index_select(0, index)
    last = None if pending is None else (pending if whole else pending.index_select(0, index)).view(n, 1)
    if any(r != 1.0 for r in rep):
        seen = torch.zeros(n * vocab, dtype=torch.bool, device=dev)
        seen.scatter_(0, seen_at_t, True)
        seen = seen.view(n, vocab)
        if last is not None:
            seen.scatter_(1, last, True)  # rows without the penalty divide by 1: unchanged
        r = floats[0]
        sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    if any(presence) or any(frequency):
        counts = torch.zeros(n * vocab, dtype=sub.dtype, device=dev)
        counts.scatter_add_(0, generated_at_t, torch.ones(len(generated_at), dtype=sub.dtype, device=dev))
        counts = counts.view(n, vocab)
        if last is not None:
            counts.scatter_add_(1, last, torch.ones(n, 1, dtype=sub.dtype, device=dev))
        sub = sub - (floats[1] * (counts > 0).to(sub.dtype) + floats[2] * counts)
    if held_at:
        sub = sub.contiguous()
        sub.view(-1).scatter_(0, held_at_t, float("-inf"))
    return sub if whole else logits.index_copy(0, index, sub)


def unpack_logprobs(row: list[float], k: int) -> tuple[float, tuple[int, ...], tuple[float, ...]]:
    """One row of Sampler.logprobs (its first 1 + 2K values, K >= k) as (logprob, top ids, top logprobs)."""
    width = (len(row) - 1) // 2
    return row[0], tuple(int(i) for i in row[1 + width:1 + width + k]), tuple(row[1:1 + k])


def _small(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-row tensor on the device. On CUDA through pinned memory, without blocking: a plain
    copy waits for the device, and with it for any step queued ahead (LLMEngine's look-ahead)."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask to -inf every token whose probability is below the row's min_p times its most likely token's (on the
    logits after temperature, top-k and top-p: the comparison of logits is the comparison of probabilities)."""
    min_p = _small([p.min_p for p in params], logits.dtype, logits.device)
    floor = logits.max(dim=-1, keepdim=True).values + torch.log(min_p).unsqueeze(1)  # log(0) = -inf: keeps all
    return logits.masked_fill(logits < floor, float("-inf"))


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams], vocab: int) -> torch.Tensor:
    """Mask to -inf every token outside each row's top-k and top-p nucleus (the top token always stays)."""
    dev = logits.device
    top_k = _small([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.int64, dev)
    top_p = _small([p.top_p for p in params], logits.dtype, dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=dev).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    drop_p = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)
