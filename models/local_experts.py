"""The in-process expert backend: stacked w13/w2 per MoE layer, run with kernels.ops.fused_experts."""

from __future__ import annotations

import torch

from ..kernels import ops


class LocalExperts:
    """Callable `(layer_id, hidden, topk_ids, topk_weights) -> [T, H]` over the experts it holds.

    With `expert_ids` (global ids of the stacked experts, in order) it holds a subset: ids it does
    not hold are mapped to -1 and contribute nothing.
    """

    def __init__(
        self,
        weights: dict[int, tuple[torch.Tensor, torch.Tensor]],
        expert_ids: list[int] | None = None,
        num_experts: int | None = None,
    ):
        self.weights = weights
        self.expert_ids = list(expert_ids) if expert_ids is not None else None
        self._table: dict[torch.device, torch.Tensor] = {}
        if self.expert_ids is not None:
            size = num_experts if num_experts is not None else max(self.expert_ids) + 1
            table = torch.full((size,), -1, dtype=torch.long)
            table[torch.tensor(self.expert_ids, dtype=torch.long)] = torch.arange(len(self.expert_ids))
            self._table[torch.device("cpu")] = table

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.weights)

    def __call__(
        self, layer_id: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        w13, w2 = self.weights[layer_id]
        if self.expert_ids is not None:
            topk_ids = self._to_local(topk_ids)
        return ops.fused_experts(hidden, w13, w2, topk_ids, topk_weights)

    def warm_up(self, top_k: int, max_tokens: int, dtype: torch.dtype) -> list[int]:
        """Compile the kernels that calls of up to max_tokens tokens launch (ops.warm_up_experts), on
        one layer's weights: every layer has the same shapes. Returns the token counts run."""
        if not self.weights:
            return []
        w13, w2 = self.weights[self.layer_ids[0]]
        return ops.warm_up_experts(w13, w2, top_k, max_tokens, dtype)

    def _to_local(self, ids: torch.Tensor) -> torch.Tensor:
        table = self._table.get(ids.device)
        if table is None:
            table = self._table[ids.device] = self._table[torch.device("cpu")].to(ids.device)
        held = (ids >= 0) & (ids < table.shape[0])
        return torch.where(held, table[ids.clamp(0, table.shape[0] - 1)], torch.full_like(ids, -1))
