"""Which module class serves each supported model_type."""

from __future__ import annotations

from .causal_lm import MoECausalLM
from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .deepseek import DeepseekForCausalLM
from .errors import ModelConfigError
from .mixtral import MixtralForCausalLM
from .qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[MoECausalLM]] = {
    "deepseek_v3": DeepseekForCausalLM,
    "deepseek_v2": DeepseekForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
}
assert set(MODEL_CLASSES) == set(SUPPORTED_MODEL_TYPES)


def model_class(config: ModelConfig) -> type[MoECausalLM]:
    try:
        return MODEL_CLASSES[config.model_type]
    except KeyError:
        raise ModelConfigError("model_type", f"{config.model_type!r} is not supported") from None


def build_model(config: ModelConfig) -> MoECausalLM:
    """An uninitialised module for `config` (construct under torch.device('meta') to skip allocation)."""
    return model_class(config)(config)
