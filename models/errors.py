"""Errors raised when a model's configuration or checkpoint cannot be used."""

from __future__ import annotations


class ModelConfigError(ValueError):
    """A config.json field is missing, out of range, or names an unsupported architecture."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config.json field {field!r}: {message}")
        self.field = field


class CheckpointError(ValueError):
    """A checkpoint tensor is missing, has the wrong shape or dtype; `tensor` names it."""

    def __init__(self, tensor: str, message: str):
        super().__init__(f"checkpoint tensor {tensor!r}: {message}")
        self.tensor = tensor
