"""The sampler: greedy, temperature, top-k, top-p, min-p, and per-request seeds independent of the batch."""

import math

import pytest
import torch

from moeserve.router.errors import InvalidRequestError
from moeserve.router.sampler import Sampler, apply_history, apply_logit_bias
from moeserve.router.sequence import SamplingParams

LOGITS = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))  # ranked: 1, 3, 2, 0


def _p(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=1, **kw)


def _frequencies(params: SamplingParams, n: int = 20000, seed: int = 0) -> torch.Tensor:
    sampler = Sampler(seed=seed)
    ids = sampler(LOGITS.repeat(n, 1), [params] * n, [None] * n)
    return torch.bincount(ids, minlength=4).double() / n


def test_greedy_is_argmax_per_row():
    logits = torch.randn(7, 33, generator=torch.Generator().manual_seed(1))
    ids = Sampler()(logits, [_p()] * 7, [None] * 7)
    assert torch.equal(ids, logits.argmax(-1))


def test_temperature_sampling_matches_the_softmax():
    for t in (0.5, 1.0, 2.0):
        want = torch.softmax(LOGITS.double() / t, -1)
        got = _frequencies(_p(temperature=t))
        assert torch.allclose(got, want, atol=0.015), (t, got, want)


def test_top_k_keeps_the_k_best_renormalised():
    got = _frequencies(_p(temperature=1.0, top_k=2))
    want = torch.tensor([0.0, 0.5, 0.0, 0.3], dtype=torch.float64) / 0.8
    assert got[0] == 0 and got[2] == 0
    assert torch.allclose(got, want, atol=0.015)
    assert torch.equal(_frequencies(_p(temperature=5.0, top_k=1), n=500), torch.tensor([0, 1.0, 0, 0], dtype=torch.float64))


def _samples_the_support_renormalised(params: SamplingParams, support: set[int]) -> None:
    """Only `support` is sampled, each token as often as its probability renormalised over the support."""
    got = _frequencies(params, n=5000)
    assert {i for i in range(4) if got[i] > 0} == support
    kept = torch.zeros(4, dtype=torch.float64)
    for i in support:
        kept[i] = LOGITS[i].exp()
    assert torch.allclose(got, kept / kept.sum(), atol=0.03)


@pytest.mark.parametrize("top_p, support", [(0.3, {1}), (0.45, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_nucleus(top_p, support):
    _samples_the_support_renormalised(_p(temperature=1.0, top_p=top_p), support)


def test_top_k_and_top_p_together():
    got = _frequencies(_p(temperature=1.0, top_k=3, top_p=0.9), n=5000)
    assert got[0] == 0 and got[2] > 0  # top-k drops token 0; the nucleus of the rest reaches token 2


@pytest.mark.parametrize("min_p, support", [(0.04, {0, 1, 2, 3}), (0.25, {1, 3, 2}), (0.35, {1, 3}), (1.0, {1})])
def test_min_p_keeps_the_tokens_near_the_likeliest(min_p, support):
    _samples_the_support_renormalised(_p(temperature=1.0, min_p=min_p), support)


def test_the_sampled_support_is_hf_generates_under_the_same_warpers():
    """Temperature, top-k, top-p and min-p together leave the tokens HF transformers' warpers leave (in its order:
    temperature, top-k, top-p, min-p), row by row on random logits."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from moeserve.router.sampler import _min_p, _top_k_top_p

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 64, generator=g) * 3
    for temperature, top_k, top_p, min_p in ((0.7, 0, 1.0, 0.1), (1.3, 20, 1.0, 0.05), (1.0, 0, 0.8, 0.2),
                                             (0.9, 10, 0.9, 0.3), (1.0, 0, 1.0, 0.0)):
        params = [_p(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * 6
        ours = _min_p(_top_k_top_p(logits / temperature, params, 64), params)
        theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1.0:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        if min_p:
            theirs = MinPLogitsWarper(min_p)(None, theirs)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), (temperature, top_k, top_p, min_p)


def test_seeded_rows_ignore_their_batch_companions():
    g = torch.Generator().manual_seed(3)
    vocab = 50
    mine = torch.randn(vocab, generator=g)
    params = _p(temperature=0.9, top_p=0.95, seed=11)

    def draws(companions: int, kinds: list[SamplingParams]) -> list[int]:
        sampler = Sampler(seed=companions)  # a different engine generator for the unseeded rows
        gen = sampler.new_generator(11)
        out = []
        for step in range(12):
            rows = [torch.randn(vocab, generator=g) for _ in range(companions)]
            logits = torch.stack(rows[: companions // 2] + [mine] + rows[companions // 2:])
            plist = [kinds[i % len(kinds)] for i in range(companions)]
            plist.insert(companions // 2, params)
            gens = [sampler.new_generator(100 + i) if p.seed is not None else None for i, p in enumerate(plist)]
            gens[companions // 2] = gen
            out.append(int(sampler(logits, plist, gens)[companions // 2]))
        return out

    alone = draws(0, [params])
    assert len(set(alone)) > 1  # it really samples
    others = [_p(), _p(temperature=1.5), _p(temperature=0.7, top_k=5, seed=4)]
    assert draws(1, others) == alone
    assert draws(7, others) == alone
    assert draws(0, [params]) == alone  # and again: same seed, same tokens


def test_unseeded_rows_follow_the_engine_seed():
    logits = torch.zeros(64, 1000)
    params = [_p(temperature=1.0)] * 64
    a = Sampler(seed=1)(logits, params, [None] * 64)
    b = Sampler(seed=1)(logits, params, [None] * 64)
    c = Sampler(seed=2)(logits, params, [None] * 64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_greedy_rows_in_a_sampling_batch_stay_greedy():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    params = [_p(), _p(temperature=3.0), _p(), _p(temperature=1.0, top_k=3), _p(temperature=0.0, seed=9), _p(temperature=2.0)]
    ids = Sampler()(logits, params, [None] * 6)
    for i in (0, 2, 4):
        assert ids[i] == logits[i].argmax()


@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=1, temperature=-0.1), "temperature"),
    (dict(max_tokens=1, temperature=math.nan), "temperature"), (dict(max_tokens=1, top_p=0.0), "top_p"),
    (dict(max_tokens=1, top_p=1.5), "top_p"), (dict(max_tokens=1, top_k=-1), "top_k"),
    (dict(max_tokens=1, min_p=1.5), "min_p"), (dict(max_tokens=1, min_p=math.nan), "min_p"),
    (dict(max_tokens=1, stop=("",)), "stop"), (dict(max_tokens=1, stop=tuple("abcdefghijklmnopq")), "stop"),
])
def test_invalid_params_name_the_field(kw, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kw)
    assert err.value.field == field


def test_repetition_penalty_is_hf_transformers_over_prompt_and_output():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, generator=g) * 3
    histories = [([1, 5, 5, 9], 2, set()), None, ([39, 0, 7], 3, set())]
    params = [_p(repetition_penalty=1.7), _p(), _p(repetition_penalty=0.6)]
    got = apply_history(logits, params, histories)
    assert torch.equal(got[1], logits[1])
    for i, pen in ((0, 1.7), (2, 0.6)):
        ids = torch.tensor([histories[i][0]])
        want = RepetitionPenaltyLogitsProcessor(pen)(ids, logits[i:i + 1].clone())[0]
        assert torch.equal(got[i], want)


def test_presence_and_frequency_penalties_count_the_output_only():
    logits = torch.zeros(1, 8)
    # prompt [3, 4]; generated 4, 5, 5, 5
    got = apply_history(logits, [_p(presence_penalty=0.5, frequency_penalty=0.25)], [([3, 4, 4, 5, 5, 5], 2, set())])[0]
    assert got.tolist() == [0, 0, 0, 0, -0.75, -1.25, 0, 0]
    got = apply_history(logits, [_p(presence_penalty=-1.0)], [([3, 4, 4], 2, set())])[0]
    assert got.tolist() == [0, 0, 0, 0, 1.0, 0, 0, 0]  # a negative penalty favours what was said


def test_min_tokens_holds_back_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # token 1 (the EOS here) is the likeliest, then 2
    params = [SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=(2,))]
    sampler = Sampler()
    assert sampler(logits, params, [None], [([7], 1, {1, 2})]).tolist() == [3]  # none generated yet
    assert sampler(logits, params, [None], [([7, 3], 1, {1, 2})]).tolist() == [3]  # one
    assert sampler(logits, params, [None], [([7, 3, 3], 1, {1, 2})]).tolist() == [1]  # two: free again


@pytest.mark.parametrize("field, kw", [
    ("repetition_penalty", dict(repetition_penalty=0.0)), ("repetition_penalty", dict(repetition_penalty=math.inf)),
    ("presence_penalty", dict(presence_penalty=2.5)), ("frequency_penalty", dict(frequency_penalty=-3.0)),
    ("min_tokens", dict(min_tokens=2)), ("min_tokens", dict(min_tokens=-1)),
])
def test_bad_penalties_are_named(field, kw):
    with pytest.raises(InvalidRequestError) as err:
        _p(**kw)  # max_tokens 1
    assert err.value.field == field


def test_logit_bias_is_added_per_row_before_the_penalties():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 10, generator=g)
    params = [_p(logit_bias={7: -100.0, 2: 3.5}), _p(), _p(logit_bias=[(0, 100)], repetition_penalty=2.0)]
    got = apply_logit_bias(logits, params)
    want = logits.clone()
    want[0, 7] -= 100.0
    want[0, 2] += 3.5
    want[2, 0] += 100.0
    assert torch.equal(got, want)
    assert apply_logit_bias(logits, [_p(), _p(), _p()]) is logits  # nobody pays for what nobody asked
    # HF's order: the bias, then the repetition penalty. Token 0 (seen) ends at (-1 + 3) / 4 = 0.5 and wins; the
    # other order would make it -1 * 4 + 3 = -1 and pick token 1.
    ids = Sampler()(torch.tensor([[-1.0, 0.0, -0.5]]), [_p(logit_bias={0: 3.0}, repetition_penalty=4.0)], [None],
                    [([0], 1, set())])
    assert ids.tolist() == [0]


@pytest.mark.parametrize("bias, field", [
    ({1: 100.5}, "logit_bias[1]"), ({1: math.nan}, "logit_bias[1]"), ({-1: 1.0}, "logit_bias"),
    ({"1": 1.0}, "logit_bias"), ([(1, 1.0), (1, 2.0)], "logit_bias"), ({i: 1.0 for i in range(301)}, "logit_bias"),
])
def test_bad_logit_bias_is_named(bias, field):
    with pytest.raises(InvalidRequestError) as err:
        _p(logit_bias=bias)
    assert err.value.field == field
    assert _p(logit_bias={9: 1, 3: -2.5}).logit_bias == ((3, -2.5), (9, 1.0))  # kept sorted, as floats
