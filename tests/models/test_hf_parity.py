"""moeserve against HF transformers on tiny random checkpoints: logits and 32-token greedy continuations.

Tolerance: final logits in float32 within atol 1e-4 (observed ~2e-6). The greedy comparison is exact;
each case first checks that HF's own top-1/top-2 margins are clear of float noise, so a seed with a
near-tie fails loudly as a bad fixture instead of passing or failing by chance.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import build_checkpoint
from moeserve.models.batch import AttentionBatch
from moeserve.models.generate import greedy_generate
from moeserve.models.loader import load_model

ATOL = 1e-4
MIN_MARGIN = 1e-4  # HF logit gap between the best two tokens at every greedy step

YARN_DEEPSEEK = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
YARN_PLAIN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}

# name: (architecture, config overrides, seed); seeds were checked for clear greedy margins.
CASES = {
    "deepseek_v3": ("deepseek_v3", {}, 0),
    "deepseek_v3-no-q-lora": ("deepseek_v3", {"q_lora_rank": None}, 0),
    "deepseek_v3-yarn": ("deepseek_v3", {"rope_parameters": YARN_DEEPSEEK}, 0),
    "deepseek_v3-halves-rope": ("deepseek_v3", {"rope_interleave": False, "first_k_dense_replace": 2}, 0),
    "deepseek_v2-lite": ("deepseek_v2", {}, 0),
    "deepseek_v2-group-limited": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                                  "q_lora_rank": 24, "routed_scaling_factor": 16.0}, 0),
    "qwen3_moe": ("qwen3_moe", {}, 0),
    "qwen3_moe-yarn": ("qwen3_moe", {"rope_parameters": YARN_PLAIN}, 0),
    "mixtral": ("mixtral", {}, 3),
    "mixtral-sliding-window": ("mixtral", {"sliding_window": 12}, 3),
}


def _prompt(n: int, vocab: int = 256, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    arch, overrides, seed = CASES[request.param]
    path, hf = build_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=seed, **overrides)
    return hf, load_model(path)


def test_logits_match_hf(pair):
    hf, model = pair
    ids = _prompt(20)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    model.allocate_kv_cache(num_blocks=8, block_size=4)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionBatch.contiguous(0, len(ids), 4))
    got = model.compute_logits(hidden)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_greedy_continuation_matches_hf(pair):
    hf, model = pair
    ids = _prompt(11, seed=1)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    want = out.sequences[0, len(ids):].tolist()
    top2 = torch.stack(out.scores).float().squeeze(1).topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    assert margin > MIN_MARGIN, f"fixture has a near-tie (margin {margin:.2e}); choose another seed"
    # block_size 4 and a prefill chunk of 5: the paged path crosses block boundaries mid-chunk.
    got = greedy_generate(model, ids, 32, block_size=4, prefill_chunk=5)
    assert got == want
