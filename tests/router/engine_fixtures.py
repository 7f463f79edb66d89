"""Helpers shared by the engine tests: a tiny checkpoint with a real tokenizer, and an expert gate.

Plain functions and classes (the fixtures that use them live in each test file).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from checkpoints import build_checkpoint, edit_config

VOCAB = 320
CORPUS = "hello world, the quick brown fox jumps over the lazy dog. STOP here! naïve café 日本語 🙂 ### ok"


def checkpoint_with_tokenizer(path: Path, arch: str = "deepseek_v3", seed: int = 0) -> Path:
    """A tiny random checkpoint whose vocabulary is a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    build_checkpoint(path, arch, seed=seed, vocab_size=VOCAB)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([CORPUS] * 20, trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(path / "tokenizer.json"))
    return path


def copy_with_eos(src: Path, dst: Path, eos_token_id: int) -> Path:
    """The same checkpoint with a different eos id in config.json."""
    shutil.copytree(src, dst)
    edit_config(dst, eos_token_id=eos_token_id)
    return dst


class ExpertGate:
    """The model's real expert backend behind a gate: a test can hold a step mid-forward, or fail it.

    `close()` makes the next expert call wait (and set `entered`) until `open()`; `fail_next()`
    makes the next call raise (a RuntimeError unless given), as a lost expert group would.
    """

    def __init__(self) -> None:
        self.inner = None
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()
        self._fail: BaseException | None = None

    def install(self, model):
        self.inner = model.experts_backend
        return self

    def close(self) -> None:
        self.entered.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def fail_next(self, error: BaseException | None = None) -> None:
        self._fail = error or RuntimeError("expert group lost (injected)")

    def __call__(self, layer_id, hidden, topk_ids, topk_weights):
        if not self._open.is_set():
            self.entered.set()
            self._open.wait()
        if self._fail is not None:
            error, self._fail = self._fail, None
            raise error
        return self.inner(layer_id, hidden, topk_ids, topk_weights)
