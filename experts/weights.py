"""Where an expert group's weights come from: a checkpoint on disk, or seeded random tensors.

Either way a group loads only the experts it holds: `load(experts, device)` returns
{layer_id: (w13 [E_local, 2I, H], w2 [E_local, H, I])} with experts stacked in the order given.
The same expert always gets the same bits, whichever group or process loads it, which is what lets
any replica stand in for any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ExpertWeights = dict[int, tuple[torch.Tensor, torch.Tensor]]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[key]


@dataclass(frozen=True, slots=True)
class CheckpointWeights:
    """Experts read from an HF-format safetensors checkpoint through `moeserve.models.load_expert_weights`."""

    path: str
    dtype: str = "float32"

    def load(self, experts: list[int], device: torch.device | str) -> ExpertWeights:
        from moeserve.models.demo import local_model_path
        from moeserve.models.loader import load_expert_weights

        return load_expert_weights(local_model_path(self.path), list(experts), device=torch.device(device),
                                   dtype=parse_dtype(self.dtype))


@dataclass(frozen=True, slots=True)
class RandomWeights:
    """Seeded random experts of a given shape, for benchmarks on models we do not have on disk.

    Each (layer, expert) has its own generator, so the tensors do not depend on which experts are
    loaded together or where.
    """

    moe_layers: tuple[int, ...]
    hidden_size: int
    intermediate_size: int
    num_experts: int
    dtype: str = "float32"
    seed: int = 0

    def load(self, experts: list[int], device: torch.device | str) -> ExpertWeights:
        dtype = parse_dtype(self.dtype)
        device = torch.device(device)
        h, i = self.hidden_size, self.intermediate_size
        out: ExpertWeights = {}
        for layer in self.moe_layers:
            w13 = torch.empty(len(experts), 2 * i, h, dtype=dtype, device=device)
            w2 = torch.empty(len(experts), h, i, dtype=dtype, device=device)
            for local, e in enumerate(experts):
                if not 0 <= e < self.num_experts:
                    raise ValueError(f"expert {e} outside 0..{self.num_experts - 1}")
                g = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + layer * 10_007 + e)
                w13[local] = (torch.randn(2 * i, h, generator=g, device=device) * h**-0.5).to(dtype)
                w2[local] = (torch.randn(h, i, generator=g, device=device) * i**-0.5).to(dtype)
            out[layer] = (w13, w2)
        return out
