"""load_tokenizer: tokenizer.json via the tokenizers library, eos ids from the checkpoint's configs."""

from __future__ import annotations

import json
import shutil

import pytest

from moeserve.models.errors import CheckpointError
from moeserve.models.tokenizer import load_tokenizer


def test_eos_ids_come_from_generation_config_first(demo_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(demo_model_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    assert load_tokenizer(d).eos_token_ids == [1, 2]
    (d / "generation_config.json").unlink()
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).eos_token_ids == [2]
    del cfg["eos_token_id"]
    (d / "config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)  # falls back to tokenizer_config.json's eos_token string
    assert tok.eos_token_ids == [tok.token_id("<|end_of_text|>")] and tok.bos_token_id == 0


def test_special_tokens_are_skipped_when_decoding(demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    ids = [tok.bos_token_id, *tok.encode("hello there"), tok.eos_token_ids[0]]
    assert tok.decode(ids) == "hello there"
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>hello there<|end_of_text|>"


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
