"""Lazy, memory-mapped access to the safetensors of a HF checkpoint directory (single or sharded).

Nothing is read until a tensor is asked for, so a part of the model (the trunk, or an expert group
holding experts 16..31) touches only its own tensors, and a shard it never needs may be absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """Tensor name -> file map of one checkpoint directory, with per-file safe_open handles."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles: dict[str, object] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(INDEX_FILE, f"unreadable index in {self.path}: {exc}") from exc
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError("model.safetensors", f"no safetensors file in {self.path}")
            self.weight_map = {name: f for f in files for name in self._open(f).keys()}
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def _open(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            full = self.path / file
            if not full.is_file():
                raise FileNotFoundError(full)
            handle = self._handles[file] = safe_open(str(full), framework="pt", device="cpu")
        return handle

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(name, f"missing from the checkpoint in {self.path}")
        try:
            return self._open(self.weight_map[name]).get_slice(name)
        except FileNotFoundError as exc:
            raise CheckpointError(name, f"its file {exc.args[0]} is missing") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def is_fp8(self, name: str) -> bool:
        return self._slice(name).get_dtype() == "F8_E4M3"

    def read(self, name: str, index: slice | None = None) -> torch.Tensor:
        """The stored tensor (dtype as on disk), or its rows `index` along dim 0, read from the memory map."""
        s = self._slice(name)
        t = s[index] if index is not None else s[:]
        self.bytes_read += t.numel() * t.element_size()
        return t
