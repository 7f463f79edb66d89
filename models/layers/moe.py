"""The MoE block: the gate picks top-k experts per token, the expert backend runs the routed ones.

The routed experts live behind `experts_backend(layer_id, hidden, topk_ids, topk_weights)`, which
may be in this process (LocalExperts) or in expert groups elsewhere; shared experts stay here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...kernels import ops
from ..config import ModelConfig
from .mlp import MLP

ExpertBackend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TopKGate(nn.Module):
    """Router weights (HF `gate.weight`, plus `e_score_correction_bias` for DeepSeek-V3)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.moe = config.moe
        self.weight = nn.Parameter(torch.zeros(self.moe.n_routed_experts, config.hidden_size))
        if self.moe.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.moe.n_routed_experts))
        self.deepseek_v2 = config.model_type == "deepseek_v2"

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids [T, k] int64, topk_weights [T, k] float32), weights final. logits: the router's logits of
        x when the caller has them already (ops.add_rms_norm_router_logits)."""
        m = self.moe
        logits = ops.router_logits(x, self.weight) if logits is None else logits
        # DeepSeek-V2's released code scales by routed_scaling_factor only when it does not renormalise.
        scaling = 1.0 if (self.deepseek_v2 and m.norm_topk_prob) else m.routed_scaling_factor
        if m.topk_method == "greedy":
            weights, ids = ops.softmax_topk(logits, m.num_experts_per_tok, m.norm_topk_prob)
            if scaling != 1.0:
                weights = weights * scaling
        else:
            weights, ids = ops.grouped_topk(
                logits,
                m.num_experts_per_tok,
                n_group=m.n_group,
                topk_group=m.topk_group,
                renormalize=m.norm_topk_prob,
                scoring=m.scoring_func,
                correction_bias=getattr(self, "e_score_correction_bias", None),
                routed_scaling_factor=scaling,
            )
        return ids, weights


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.gate = TopKGate(config)
        if config.moe.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe.shared_intermediate_size)
        self.has_shared = bool(config.moe.n_shared_experts)
        self.experts_backend: ExpertBackend | None = None

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The routed experts' output for x (plus the shared experts'); logits: the router's, if taken already."""
        if self.experts_backend is None:
            raise RuntimeError("no expert backend: load the model with load_experts=True or call set_expert_backend()")
        ids, weights = self.gate(x, logits)
        submit = getattr(self.experts_backend, "submit", None)
        if self.has_shared and submit is not None:
            # A backend that dispatches to expert groups returns at once; the shared experts run meanwhile.
            pending = submit(self.layer_id, x, ids, weights)
            shared = self.shared_experts(x)
            return pending.wait() + shared
        out = self.experts_backend(self.layer_id, x, ids, weights)
        if self.has_shared:
            out = out + self.shared_experts(x)
        return out
