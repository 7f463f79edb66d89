"""Build models and expert weights from a HF checkpoint directory, reading only what each part owns.

`load_model` reads the trunk (and, by default, all routed experts into LocalExperts);
`load_expert_weights` reads chosen experts of every MoE layer for an expert group. FP8 block-scaled
weights (DeepSeek-V3/R1) are dequantised to the compute dtype, or kept raw with `keep_fp8=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels.reference import block_dequant
from .causal_lm import MoECausalLM
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import CheckpointError
from .local_experts import LocalExperts
from .registry import model_class

# Router weights stay float32 whatever the compute dtype: top-k picks are sensitive to rounding.
_FP32_SUFFIXES = (".gate.weight", ".gate.e_score_correction_bias")


@dataclass(slots=True)
class Fp8ExpertWeights:
    """Raw FP8 experts of one layer: w13 [E, 2I, H] / w2 [E, H, I] e4m3 with their block scale_inv."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale_inv: torch.Tensor  # [E, 2I/bn, ceil(H/bk)] float32
    w2_scale_inv: torch.Tensor  # [E, ceil(H/bn), ceil(I/bk)] float32
    block_size: tuple[int, int]


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, load_experts: bool = True
) -> MoECausalLM:
    """The model of a HF checkpoint dir; with load_experts=False no routed-expert tensor is read."""
    config = ModelConfig.from_dir(path)
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    ckpt = Checkpoint(path)
    state = {}
    for name, meta in model.state_dict().items():
        want = torch.float32 if name.endswith(_FP32_SUFFIXES) else dtype
        state[name] = _read_weight(ckpt, config, cls.checkpoint_names(name), tuple(meta.shape), want, device)
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False).eval()
    if load_experts:
        experts = list(range(config.moe.n_routed_experts))
        model.set_expert_backend(LocalExperts(_read_experts(ckpt, config, cls, experts, device, dtype)))
    return model


def load_expert_weights(
    path: str | Path,
    expert_ids: list[int],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_fp8: bool = False,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | dict[int, Fp8ExpertWeights]:
    """{layer_id: (w13 [E_local, 2I, H], w2 [E_local, H, I])} for `expert_ids`, in that order.

    keep_fp8=True returns {layer_id: Fp8ExpertWeights} with the stored e4m3 weights and scales instead.
    """
    config = ModelConfig.from_dir(path)
    cls = model_class(config)
    ids = [int(e) for e in expert_ids]
    bad = [e for e in ids if not 0 <= e < config.moe.n_routed_experts]
    if bad or len(set(ids)) != len(ids) or not ids:
        raise ValueError(
            f"expert_ids must be distinct ids in [0, {config.moe.n_routed_experts}); got {ids}" + (f" (bad: {bad})" if bad else "")
        )
    ckpt = Checkpoint(path)
    if keep_fp8:
        return _read_fp8_experts(ckpt, config, cls, ids, device)
    return _read_experts(ckpt, config, cls, ids, device, dtype)


def _find(ckpt: Checkpoint, names: list[str]) -> str:
    for name in names:
        if name in ckpt:
            return name
    raise CheckpointError(names[0], f"missing from the checkpoint in {ckpt.path}")


def _check_shape(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    got = ckpt.shape(name)
    if got != shape:
        raise CheckpointError(name, f"has shape {list(got)}, expected {list(shape)}")


def _dequantise(ckpt: Checkpoint, config: ModelConfig, name: str, raw: torch.Tensor, device, rows: slice | None = None):
    if config.quant is None:
        raise CheckpointError(name, "is FP8 but config.json has no quantization_config")
    bn, bk = config.quant.weight_block_size
    scale_name = name + "_scale_inv"
    n, k = raw.shape[-2:]
    expect = (*raw.shape[:-2], -(-n // bn), -(-k // bk))
    scale = ckpt.read(scale_name, rows)
    if tuple(scale.shape) != expect:
        raise CheckpointError(scale_name, f"has shape {list(scale.shape)}, expected {list(expect)}")
    return block_dequant(raw.to(device), scale.to(device), (bn, bk))


def _read_weight(
    ckpt: Checkpoint, config: ModelConfig, names: list[str], shape: tuple[int, ...], dtype, device, rows: slice | None = None
) -> torch.Tensor:
    """One tensor (the first of `names` present), checked against `shape`, dequantised if FP8."""
    name = _find(ckpt, names)
    full = ckpt.shape(name)
    if rows is None:
        _check_shape(ckpt, name, shape)
    elif full[1:] != shape[1:] or rows.stop > full[0]:
        raise CheckpointError(name, f"has shape {list(full)}, expected [>= {rows.stop}, {', '.join(map(str, shape[1:]))}]")
    raw = ckpt.read(name, rows)
    if ckpt.is_fp8(name):
        return _dequantise(ckpt, config, name, raw, device, rows).to(dtype)
    return raw.to(device=device, dtype=dtype)


def _expert_layout(ckpt: Checkpoint, cls: type[MoECausalLM], layer: int, first_expert: int) -> tuple[str, str] | None:
    """(fused gate_up name, fused down name) when this layer stores experts fused, else None (per expert)."""
    prefix = cls.expert_prefix.format(layer=layer)
    if f"{prefix}.{first_expert}.{cls.expert_proj_names[0]}.weight" in ckpt:
        return None
    for p in cls.checkpoint_names(prefix + "."):
        if f"{p}gate_up_proj" in ckpt:
            return f"{p}gate_up_proj", f"{p}down_proj"
    return None


def _read_experts(ckpt: Checkpoint, config: ModelConfig, cls, ids: list[int], device, dtype):
    h, i = config.hidden_size, config.moe.moe_intermediate_size
    g, u, d = cls.expert_proj_names
    out = {}
    for layer in config.moe.moe_layer_ids:
        prefix = cls.expert_prefix.format(layer=layer)
        w13 = torch.empty(len(ids), 2 * i, h, device=device, dtype=dtype)
        w2 = torch.empty(len(ids), h, i, device=device, dtype=dtype)
        fused = _expert_layout(ckpt, cls, layer, ids[0])
        for j, e in enumerate(ids):
            if fused is None:
                w13[j, :i] = _read_weight(ckpt, config, [f"{prefix}.{e}.{g}.weight"], (i, h), dtype, device)
                w13[j, i:] = _read_weight(ckpt, config, [f"{prefix}.{e}.{u}.weight"], (i, h), dtype, device)
                w2[j] = _read_weight(ckpt, config, [f"{prefix}.{e}.{d}.weight"], (h, i), dtype, device)
            else:
                rows = slice(e, e + 1)
                w13[j] = _read_weight(ckpt, config, [fused[0]], (1, 2 * i, h), dtype, device, rows)[0]
                w2[j] = _read_weight(ckpt, config, [fused[1]], (1, h, i), dtype, device, rows)[0]
        out[layer] = (w13, w2)
    return out


def _read_fp8_experts(ckpt: Checkpoint, config: ModelConfig, cls, ids: list[int], device) -> dict[int, Fp8ExpertWeights]:
    if config.quant is None:
        raise CheckpointError("quantization_config", f"keep_fp8=True but {ckpt.path} is not an FP8 checkpoint")
    bn, bk = config.quant.weight_block_size
    h, i = config.hidden_size, config.moe.moe_intermediate_size
    if i % bn:
        # gate and up each start a new block row; stacked as w13 their scales only tile if I % bn == 0.
        raise CheckpointError("moe_intermediate_size", f"keep_fp8 needs it to be a multiple of {bn}, got {i}")
    g, u, d = cls.expert_proj_names
    out = {}
    for layer in config.moe.moe_layer_ids:
        prefix = cls.expert_prefix.format(layer=layer)
        parts: dict[str, list[torch.Tensor]] = {"w13": [], "w2": [], "s13": [], "s2": []}
        for e in ids:
            tensors = {}
            for proj, shape in ((g, (i, h)), (u, (i, h)), (d, (h, i))):
                name = f"{prefix}.{e}.{proj}.weight"
                _check_shape(ckpt, name, shape)
                if not ckpt.is_fp8(name):
                    raise CheckpointError(name, "keep_fp8=True but this weight is not float8_e4m3fn")
                scale_shape = (-(-shape[0] // bn), -(-shape[1] // bk))
                _check_shape(ckpt, name + "_scale_inv", scale_shape)
                tensors[proj] = (ckpt.read(name), ckpt.read(name + "_scale_inv").float())
            parts["w13"].append(torch.cat([tensors[g][0], tensors[u][0]]))
            parts["s13"].append(torch.cat([tensors[g][1], tensors[u][1]]))
            parts["w2"].append(tensors[d][0])
            parts["s2"].append(tensors[d][1])
        out[layer] = Fp8ExpertWeights(
            w13=torch.stack(parts["w13"]).to(device),
            w2=torch.stack(parts["w2"]).to(device),
            w13_scale_inv=torch.stack(parts["s13"]).to(device),
            w2_scale_inv=torch.stack(parts["s2"]).to(device),
            block_size=(bn, bk),
        )
    return out
