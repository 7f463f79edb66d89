"""The checkpoint's tokenizer.json (tokenizers library) with the eos ids generation stops on."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError


class Tokenizer:
    """encode/decode plus `eos_token_ids` (generation_config.json, else config.json, else tokenizer_config.json)."""

    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: list[int], bos_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _special(tok: HFTokenizer, value) -> int | None:
    # tokenizer_config.json spells special tokens as strings or {"content": ...} objects.
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json from a checkpoint directory."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError("tokenizer.json", f"no tokenizer.json in {path}")
    tok = HFTokenizer.from_file(str(file))
    gen, cfg, tok_cfg = _json(path / "generation_config.json"), _json(path / "config.json"), _json(path / "tokenizer_config.json")
    eos = _ids(gen.get("eos_token_id")) or _ids(cfg.get("eos_token_id"))
    if not eos and (special := _special(tok, tok_cfg.get("eos_token"))) is not None:
        eos = [special]
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is None:
        bos = _special(tok, tok_cfg.get("bos_token"))
    return Tokenizer(tok, eos, bos)
