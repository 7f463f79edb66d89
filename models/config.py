"""One normalised model configuration, built once from a HF `config.json` and validated on entry.

DeepSeek-V3/V2, Qwen3-MoE and Mixtral spell the same ideas differently (n_routed_experts,
num_experts, num_local_experts ...); everything below `models/` reads only `ModelConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "mixtral")
_DEFAULT_THETA = {"deepseek_v3": 10000.0, "deepseek_v2": 10000.0, "qwen3_moe": 10000.0, "mixtral": 1e6}
_TOPK_METHODS = {"deepseek_v3": ("noaux_tc",), "deepseek_v2": ("greedy", "group_limited_greedy")}


@dataclass(slots=True)
class RopeConfig:
    """Rotary embedding: plain RoPE or YaRN (with DeepSeek's mscale / mscale_all_dim)."""

    theta: float
    type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleaved: bool = False  # rotate pairs (2i, 2i+1) as DeepSeek does, else halves (i, i+d/2)


@dataclass(slots=True)
class MLAConfig:
    """Multi-head latent attention dims (DeepSeek-V2/V3); q_lora_rank None means a plain q_proj."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(slots=True)
class MoEConfig:
    """The routed and shared experts and how the gate picks them."""

    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_layer_ids: list[int]
    n_shared_experts: int = 0
    shared_intermediate_size: int = 0
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0


@dataclass(slots=True)
class QuantConfig:
    """Block-scaled FP8 weights as in the DeepSeek-V3/R1 release (`weight_scale_inv` per block)."""

    method: str = "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)


@dataclass(slots=True)
class ModelConfig:
    """Architecture-independent view of a MoE causal LM; built by `from_hf`, never by hand."""

    model_type: str
    architectures: list[str]
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # query/key head dim (for MLA: qk_nope_head_dim + qk_rope_head_dim)
    v_head_dim: int
    intermediate_size: int  # dense MLP layers; 0 when every layer is MoE
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope: RopeConfig
    moe: MoEConfig
    mla: MLAConfig | None = None
    quant: QuantConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    dtype: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def moe_layers(self) -> frozenset[int]:
        return frozenset(self.moe.moe_layer_ids)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Normalise a HF config.json dict; raises ModelConfigError naming the offending field."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                "model_type", f"{model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if _get(d, "hidden_act", "silu") != "silu":
            raise ModelConfigError("hidden_act", f"{d['hidden_act']!r} is not supported; only 'silu'")
        if d.get("mlp_bias"):
            raise ModelConfigError("mlp_bias", "MLP biases are not supported")
        layers = _req(d, "num_hidden_layers", int)
        heads = _req(d, "num_attention_heads", int)
        hidden = _req(d, "hidden_size", int)
        common = dict(
            model_type=model_type,
            architectures=list(d.get("architectures") or []),
            vocab_size=_req(d, "vocab_size", int),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            rms_norm_eps=float(_get(d, "rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(_get(d, "tie_word_embeddings", False)),
            max_position_embeddings=_req(d, "max_position_embeddings", int),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_id_list(d.get("eos_token_id")),
            attention_bias=bool(_get(d, "attention_bias", False)),
            quant=_quant(d.get("quantization_config")),
            dtype=d.get("torch_dtype") or d.get("dtype"),
            hf_config=dict(d),
        )
        if model_type.startswith("deepseek"):
            return cls(**common, **_deepseek(d, model_type, layers, heads))
        if model_type == "qwen3_moe":
            return cls(**common, **_qwen3_moe(d, layers, heads, hidden))
        return cls(**common, **_mixtral(d, layers, heads, hidden))

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """Read config.json (and generation_config.json's eos ids, which win, as in HF generate)."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelConfigError("config.json", f"no config.json in {path}")
        config = cls.from_hf(json.loads(cfg_file.read_text()))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen = json.loads(gen_file.read_text())
            if gen.get("eos_token_id") is not None:
                config.eos_token_ids = _id_list(gen["eos_token_id"])
        return config


def _req(d: dict, key: str, typ: type) -> Any:
    value = d.get(key)
    if value is None:
        raise ModelConfigError(key, "missing")
    try:
        return typ(value)
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(key, f"expected {typ.__name__}, got {value!r}") from exc


def _get(d: dict, key: str, default: Any) -> Any:
    value = d.get(key)
    return default if value is None else value


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _rope(d: dict, model_type: str, interleaved: bool) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; released checkpoints carry rope_theta + rope_scaling.
    params = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelConfigError("rope_parameters", "per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or d.get("rope_theta") or _DEFAULT_THETA[model_type])
    if rope_type == "default":
        return RopeConfig(theta=theta, interleaved=interleaved)
    if rope_type != "yarn":
        raise ModelConfigError("rope_scaling.type", f"{rope_type!r} is not supported; use 'default' or 'yarn'")
    max_pos = _req(d, "max_position_embeddings", int)
    original = int(d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    if factor <= 0:
        raise ModelConfigError("rope_scaling.factor", f"must be > 0, got {factor}")
    return RopeConfig(
        theta=theta,
        type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleaved=interleaved,
    )


def _quant(q: dict | None) -> QuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ModelConfigError("quantization_config.quant_method", f"{method!r} is not supported; only 'fp8'")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ModelConfigError("quantization_config.fmt", f"{fmt!r} is not supported; only 'e4m3'")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
        raise ModelConfigError("quantization_config.weight_block_size", f"expected [rows, cols], got {block!r}")
    return QuantConfig(method="fp8", fmt="e4m3", weight_block_size=(int(block[0]), int(block[1])))


def _deepseek(d: dict, model_type: str, layers: int, heads: int) -> dict:
    v3 = model_type == "deepseek_v3"
    q_lora = d.get("q_lora_rank")
    mla = MLAConfig(
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=_req(d, "kv_lora_rank", int),
        qk_nope_head_dim=_req(d, "qk_nope_head_dim", int),
        qk_rope_head_dim=_req(d, "qk_rope_head_dim", int),
        v_head_dim=_req(d, "v_head_dim", int),
    )
    first_dense = int(_get(d, "first_k_dense_replace", 0))
    freq = int(_get(d, "moe_layer_freq", 1))
    if freq < 1:
        raise ModelConfigError("moe_layer_freq", f"must be >= 1, got {freq}")
    moe_inter = _req(d, "moe_intermediate_size", int)
    n_shared = int(_get(d, "n_shared_experts", 0))
    topk_method = _get(d, "topk_method", "noaux_tc" if v3 else "greedy")
    if topk_method not in _TOPK_METHODS[model_type]:
        raise ModelConfigError("topk_method", f"{topk_method!r} not supported for {model_type}; use {_TOPK_METHODS[model_type]}")
    moe = MoEConfig(
        n_routed_experts=_req(d, "n_routed_experts", int),
        num_experts_per_tok=_req(d, "num_experts_per_tok", int),
        moe_intermediate_size=moe_inter,
        moe_layer_ids=[i for i in range(layers) if i >= first_dense and i % freq == 0],
        n_shared_experts=n_shared,
        shared_intermediate_size=moe_inter * n_shared,
        scoring_func=_get(d, "scoring_func", "sigmoid" if v3 else "softmax"),
        topk_method=topk_method,
        n_group=int(_get(d, "n_group", 1)),
        topk_group=int(_get(d, "topk_group", 1)),
        norm_topk_prob=bool(_get(d, "norm_topk_prob", v3)),
        routed_scaling_factor=float(_get(d, "routed_scaling_factor", 1.0)),
    )
    dense = len(moe.moe_layer_ids) < layers
    return dict(
        num_key_value_heads=heads,  # MLA: every head reads the one shared latent
        head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        intermediate_size=_req(d, "intermediate_size", int) if dense else int(_get(d, "intermediate_size", 0)),
        rope=_rope(d, model_type, bool(_get(d, "rope_interleave", True)) if v3 else True),
        moe=moe,
        mla=mla,
    )


def _qwen3_moe(d: dict, layers: int, heads: int, hidden: int) -> dict:
    n_experts = d.get("num_experts", d.get("num_local_experts"))
    if n_experts is None:
        raise ModelConfigError("num_experts", "missing")
    step = int(_get(d, "decoder_sparse_step", 1))
    if step < 1:
        raise ModelConfigError("decoder_sparse_step", f"must be >= 1, got {step}")
    dense_only = {int(i) for i in _get(d, "mlp_only_layers", [])}
    moe_ids = [i for i in range(layers) if i not in dense_only and int(n_experts) > 0 and (i + 1) % step == 0]
    head_dim = int(_get(d, "head_dim", hidden // heads))
    moe = MoEConfig(
        n_routed_experts=int(n_experts),
        num_experts_per_tok=_req(d, "num_experts_per_tok", int),
        moe_intermediate_size=_req(d, "moe_intermediate_size", int),
        moe_layer_ids=moe_ids,
        norm_topk_prob=bool(_get(d, "norm_topk_prob", False)),
    )
    dense = len(moe_ids) < layers
    return dict(
        num_key_value_heads=int(_get(d, "num_key_value_heads", heads)),
        head_dim=head_dim,
        v_head_dim=head_dim,
        intermediate_size=_req(d, "intermediate_size", int) if dense else int(_get(d, "intermediate_size", 0)),
        rope=_rope(d, "qwen3_moe", False),
        moe=moe,
        qk_norm=True,
        sliding_window=d.get("sliding_window") if d.get("use_sliding_window") else None,
    )


def _mixtral(d: dict, layers: int, heads: int, hidden: int) -> dict:
    head_dim = int(_get(d, "head_dim", hidden // heads))
    moe = MoEConfig(
        n_routed_experts=_req(d, "num_local_experts", int),
        num_experts_per_tok=int(_get(d, "num_experts_per_tok", 2)),
        moe_intermediate_size=_req(d, "intermediate_size", int),
        moe_layer_ids=list(range(layers)),
        norm_topk_prob=True,  # Mixtral always renormalises its top-k softmax weights
    )
    return dict(
        num_key_value_heads=int(_get(d, "num_key_value_heads", heads)),
        head_dim=head_dim,
        v_head_dim=head_dim,
        intermediate_size=0,
        rope=_rope(d, "mixtral", False),
        moe=moe,
        sliding_window=d.get("sliding_window"),
    )


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ModelConfigError(name, f"must be > 0, got {value}")


def _validate(c: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "v_head_dim", "max_position_embeddings"):
        _positive(name, getattr(c, name))
    if c.num_attention_heads % c.num_key_value_heads:
        raise ModelConfigError(
            "num_key_value_heads", f"{c.num_key_value_heads} does not divide num_attention_heads={c.num_attention_heads}"
        )
    if c.sliding_window is not None:
        _positive("sliding_window", int(c.sliding_window))
    m = c.moe
    _positive("num_experts_per_tok", m.num_experts_per_tok)
    _positive("moe_intermediate_size", m.moe_intermediate_size)
    if m.num_experts_per_tok > m.n_routed_experts:
        raise ModelConfigError("num_experts_per_tok", f"{m.num_experts_per_tok} > {m.n_routed_experts} routed experts")
    if not m.moe_layer_ids:
        raise ModelConfigError("num_hidden_layers", "the model has no MoE layer")
    if m.moe_layer_ids != sorted(set(m.moe_layer_ids)) or not 0 <= m.moe_layer_ids[0] <= m.moe_layer_ids[-1] < c.num_hidden_layers:
        raise ModelConfigError("moe_layer_ids", f"must be sorted distinct layer ids, got {m.moe_layer_ids}")
    if len(m.moe_layer_ids) < c.num_hidden_layers:
        _positive("intermediate_size", c.intermediate_size)
    if m.scoring_func not in ("softmax", "sigmoid"):
        raise ModelConfigError("scoring_func", f"{m.scoring_func!r} is not supported; use 'softmax' or 'sigmoid'")
    if m.topk_method == "noaux_tc" and m.scoring_func != "sigmoid":
        raise ModelConfigError("scoring_func", "topk_method 'noaux_tc' needs scoring_func 'sigmoid'")
    if m.topk_method in ("noaux_tc", "group_limited_greedy"):
        _positive("n_group", m.n_group)
        if m.n_routed_experts % m.n_group:
            raise ModelConfigError("n_group", f"{m.n_group} does not divide n_routed_experts={m.n_routed_experts}")
        if not 1 <= m.topk_group <= m.n_group:
            raise ModelConfigError("topk_group", f"must be in [1, n_group={m.n_group}], got {m.topk_group}")
        if m.num_experts_per_tok > m.topk_group * (m.n_routed_experts // m.n_group):
            raise ModelConfigError("num_experts_per_tok", "more than the experts in topk_group groups")
        if m.topk_method == "noaux_tc" and m.n_routed_experts // m.n_group < 2:
            raise ModelConfigError("n_group", "noaux_tc ranks groups by their two best experts; need >= 2 per group")
    if c.mla is not None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive(name, getattr(c.mla, name))
        if c.mla.q_lora_rank is not None:
            _positive("q_lora_rank", c.mla.q_lora_rank)
        if c.mla.qk_rope_head_dim % 2:
            raise ModelConfigError("qk_rope_head_dim", f"the rotary dim must be even, got {c.mla.qk_rope_head_dim}")
    elif c.head_dim % 2:
        raise ModelConfigError("head_dim", f"the rotary dim must be even, got {c.head_dim}")
