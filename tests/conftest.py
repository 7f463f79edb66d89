"""Fixtures shared by every test folder (this file only adds; see tests/checkpoints.py for builders)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: `hf_checkpoint("mixtral", seed=0, **config_overrides) -> Path` of a tiny HF checkpoint.

    Built once per distinct arguments per session; treat the directory as read-only.
    """
    from checkpoints import build_checkpoint

    cache: dict[tuple, Path] = {}

    def make(arch: str, seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-ckpt")
            cache[key] = build_checkpoint(path, arch, seed, **overrides)[0]
        return cache[key]

    return make


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The embedded demo model (DeepSeek-V3 architecture, with tokenizer), written once per session."""
    from moeserve.models.demo import write_demo_model

    path = tmp_path_factory.mktemp("demo-model") / "demo"
    write_demo_model(path, seed=0)
    return path
