"""The launch-configuration table: lookup, defaults, and the shipped tables' validity."""

import json

import pytest

from moeserve.kernels import configs
from moeserve.kernels.configs import GemmConfig, GemvConfig, MoeConfig


def test_nearest_bucket_and_default(tmp_path, monkeypatch):
    a = MoeConfig(16, GemmConfig(block_n=32), GemmConfig(block_n=64))
    b = MoeConfig(64, GemmConfig(block_n=128, num_warps=8), GemmConfig(block_n=128))
    key = configs.shape_key(128, 2048, 768, 8, "bf16")
    (tmp_path / "Test_GPU.json").write_text(json.dumps({key: {"1": a.to_dict(), "256": b.to_dict()}}))
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs.load_table.cache_clear()
    configs.get_config.cache_clear()
    try:
        assert configs.get_config("Test GPU", 1, 128, 2048, 768, 8) == a
        assert configs.get_config("Test GPU", 8, 128, 2048, 768, 8) == a
        assert configs.get_config("Test GPU", 4096, 128, 2048, 768, 8) == b
        other = configs.get_config("Test GPU", 8, 64, 2048, 1408, 6)
        assert other == configs.default_config(8, 64, 2048, 1408, 6)
    finally:
        configs.load_table.cache_clear()
        configs.get_config.cache_clear()


def test_decode_entries_do_not_reach_many_tokens(tmp_path, monkeypatch):
    """A table tuned only at a few tokens (GEMVs, a block per slot) serves those up to 4x away; further
    up the defaults' tensor-core tiles run instead of one row per expert slot."""
    gemv = MoeConfig(16, GemmConfig(block_n=32), GemmConfig(block_n=64), gemv=GemvConfig(up_rows=2))
    slot = MoeConfig(16, GemmConfig(block_n=32), GemmConfig(block_n=64), per_slot=True)
    key = configs.shape_key(256, 7168, 2048, 8, "bf16")
    (tmp_path / "Test_GPU.json").write_text(json.dumps({key: {"4": gemv.to_dict()},
                                                        key.replace("bf16", "fp8"): {"1": slot.to_dict()}}))
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs.load_table.cache_clear()
    configs.get_config.cache_clear()
    try:
        for t in (1, 4, 16):
            assert configs.get_config("Test GPU", t, 256, 7168, 2048, 8) == gemv
        for t in (17, 64, 4096):
            assert configs.get_config("Test GPU", t, 256, 7168, 2048, 8) == configs.default_config(t, 256, 7168, 2048, 8)
        assert configs.get_config("Test GPU", 4, 256, 7168, 2048, 8, "fp8") == slot
        assert configs.get_config("Test GPU", 5, 256, 7168, 2048, 8, "fp8") == \
            configs.default_config(5, 256, 7168, 2048, 8, "fp8")
    finally:
        configs.load_table.cache_clear()
        configs.get_config.cache_clear()


def test_same_processor_borrows_a_table(tmp_path, monkeypatch):
    """A GPU with no table of its own uses its processor's (an H200 the H100's); its own buckets win
    once it has them, the borrowed table still fills the rest; a GPU of another processor gets the
    defaults."""
    a = MoeConfig(16, GemmConfig(block_n=32), GemmConfig(block_n=64))
    b = MoeConfig(32, GemmConfig(block_n=64), GemmConfig(block_n=128))
    key = configs.shape_key(128, 2048, 768, 8, "bf16")
    (tmp_path / "NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps({key: {"8": a.to_dict(), "1024": a.to_dict()}}))
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs.load_table.cache_clear()
    configs.get_config.cache_clear()
    try:
        assert configs.get_config("NVIDIA H200", 8, 128, 2048, 768, 8) == a
        assert configs.get_config("NVIDIA A100-SXM4-80GB", 8, 128, 2048, 768, 8) == \
            configs.default_config(8, 128, 2048, 768, 8)
        (tmp_path / "NVIDIA_H200.json").write_text(json.dumps({key: {"8": b.to_dict()}}))
        configs.load_table.cache_clear()
        configs.get_config.cache_clear()
        assert configs.get_config("NVIDIA H200", 8, 128, 2048, 768, 8) == b
        assert configs.get_config("NVIDIA H200", 1024, 128, 2048, 768, 8) == a
        assert configs.get_config("NVIDIA H100 80GB HBM3", 8, 128, 2048, 768, 8) == a
    finally:
        configs.load_table.cache_clear()
        configs.get_config.cache_clear()


@pytest.mark.parametrize("quant", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("t", [1, 8, 64, 256, 1024, 4096])
def test_defaults_are_valid(quant, t):
    cfg = configs.default_config(t, 128, 2048, 768, 8, quant)
    assert MoeConfig.from_dict(cfg.to_dict()) == cfg
    if quant == "fp8":
        assert cfg.up.block_k == cfg.down.block_k == 128


@pytest.mark.parametrize("quant", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("t", [1, 8, 64, 256, 1024, 4096])
def test_defaults_fit_shared_memory(quant, t):
    """A default that needs more shared memory than a Hopper block has fails at launch (seen on the
    H100 with FP8 at 128-row tiles and four stages)."""
    from moeserve.kernels.search_space import SMEM_LIMIT, smem_bytes

    cfg = configs.default_config(t, 32, 7168, 2048, 8, quant)
    weight_bytes = 2 if quant == "bf16" else 1
    assert smem_bytes(cfg.block_m, cfg.up, True, weight_bytes) <= SMEM_LIMIT
    assert smem_bytes(cfg.block_m, cfg.down, False, weight_bytes) <= SMEM_LIMIT


def test_shipped_tables_parse():
    for path in configs.CONFIG_DIR.glob("*.json"):
        table = json.loads(path.read_text())
        for key, buckets in table.items():
            assert key.startswith("E=") and buckets, path
            for bucket, entry in buckets.items():
                assert int(bucket) >= 1
                MoeConfig.from_dict(entry)  # validates


def test_gemv_config_round_trips():
    cfg = MoeConfig(gemv=GemvConfig(up_rows=2, down_rows=16, up_warps=8, down_warps=4, combine=False))
    assert MoeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert MoeConfig.from_dict(MoeConfig().to_dict()).gemv is None


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="up_rows"):
        GemvConfig(up_rows=3)
    with pytest.raises(ValueError, match="block_n"):
        GemmConfig(block_n=48)
    with pytest.raises(ValueError, match="block_m"):
        MoeConfig(block_m=8)
