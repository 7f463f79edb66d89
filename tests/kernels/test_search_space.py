"""The autotuner's candidate launch configurations."""

import dataclasses

import pytest

from moeserve.kernels.configs import MoeConfig
from moeserve.kernels.search_space import (SMEM_LIMIT, block_m_choices, gemm_choices, gemv_down_choices,
                                           gemv_tile, gemv_up_choices, per_slot_choices, prequant_choices,
                                           rows_per_expert, smem_bytes)


def test_block_m_follows_rows_per_expert():
    assert rows_per_expert(1, 128, 8) == 1
    assert rows_per_expert(4096, 128, 8) == 256
    assert block_m_choices(64, 128, 8) == [16]  # 4 rows per expert: decode
    assert block_m_choices(256, 128, 8) == [16, 32, 64]
    assert block_m_choices(1024, 128, 8) == [32, 64, 128]
    assert block_m_choices(4096, 64, 6) == [64, 128]


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
@pytest.mark.parametrize("quant", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("gated", [True, False])
def test_candidates_are_valid_and_fit(block_m, quant, gated):
    cands = gemm_choices(block_m, quant, gated)
    assert cands and len(set(cands)) == len(cands)
    weight_bytes = 2 if quant == "bf16" else 1
    for cfg in cands:
        assert smem_bytes(block_m, cfg, gated, weight_bytes) <= SMEM_LIMIT
        MoeConfig(block_m, cfg, cfg)  # validates
        if quant == "fp8":
            assert cfg.block_k == 128  # one activation scale group per K step


def test_per_slot_only_for_few_tokens():
    assert per_slot_choices(1) == [False, True]
    assert per_slot_choices(64) == [False]


def test_prequant_only_for_fp8():
    assert prequant_choices("fp8") == [False, True]
    assert prequant_choices("bf16") == prequant_choices("int8") == [False]


@pytest.mark.parametrize("quant", ["bf16", "fp8"])
def test_swapped_tiles_only_where_weight_rows_fill_a_warpgroup_tile(quant):
    small = gemm_choices(16, quant, True)
    swapped = [c for c in small if c.swap_ab]
    assert swapped and all(c.block_n >= 64 for c in swapped)
    assert {dataclasses.replace(c, swap_ab=False) for c in swapped} <= set(small)  # each beside its unswapped twin
    assert not any(c.swap_ab for c in gemm_choices(64, quant, True))  # 64-row tiles fill it already


@pytest.mark.parametrize("quant", ["bf16", "fp8", "int8"])
def test_gemv_candidates_fit_registers_and_stop_past_few_tokens(quant):
    """The expert GEMVs are tried at decode sizes only, with tiles that fit gemv_tile(): qwen3's H 2048
    and I 768 (padded to 1024), top-8, whose combined down program holds eight slots' rows."""
    up = gemv_up_choices(1, 2048, quant)
    down = gemv_down_choices(1, 768, 8, quant)
    assert up and down and len(set(up)) == len(up) and len(set(down)) == len(down)
    assert all(2 * rows * 2048 <= gemv_tile(quant) for rows, _ in up)
    assert all((8 if combine else 1) * rows * 1024 <= gemv_tile(quant) for rows, _, combine, _ in down)
    assert gemv_tile("fp8") == 2 * gemv_tile("bf16")  # the same bytes in flight
    assert {combine for _, _, combine, _ in down} == {False, True}
    # I = 768 (1024 padded) is also tried as 512 + 256; I = 2048 needs one piece only
    assert {pieces for *_, pieces in down} == {1, 2}
    assert {pieces for *_, pieces in gemv_down_choices(1, 2048, 8, quant)} == {1}
    assert gemv_up_choices(16, 2048, quant) == gemv_down_choices(16, 768, 8, quant) == []
