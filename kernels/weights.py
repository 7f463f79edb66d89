"""Expert weights of one MoE layer in the kernels' layout, and loading them from checkpoint tensors.

Layouts (E experts, hidden H, intermediate I), the nn.Linear (out, in) layout of the checkpoints:
- bf16 (or any float): w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]; no scales.
- fp8 (DeepSeek-V3/R1): w13, w2 in float8_e4m3fn with 128x128 block scales as shipped
  (`weight_scale_inv`, multiply to dequantise): w13_scale [E, 2*ceil(I/128), ceil(H/128)] holds the
  gate's blocks then the up's blocks (so I need not be a multiple of 128), w2_scale
  [E, ceil(H/128), ceil(I/128)].
- int8 weight-only: w13, w2 in int8 with one float32 scale per output row: w13_scale [E, 2I],
  w2_scale [E, H].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

BLOCK = 128
QUANTS = ("bf16", "fp8", "int8")
_CHECKPOINT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # DeepSeek/Qwen, Mixtral


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shapes(e: int, h: int, i: int, quant: str) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Shapes of w13_scale and w2_scale for e experts of hidden size h and intermediate size i (None:
    the format has no scales)."""
    return {
        "bf16": (None, None),
        "fp8": ((e, 2 * _cdiv(i, BLOCK), _cdiv(h, BLOCK)), (e, _cdiv(h, BLOCK), _cdiv(i, BLOCK))),
        "int8": ((e, 2 * i), (e, h)),
    }[quant]


@dataclass(frozen=True)
class ExpertWeights:
    """Stacked expert weights plus their scales; `quant` is 'bf16' (unquantised), 'fp8' or 'int8'."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    quant: str = "bf16"

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise ValueError(f"ExpertWeights.quant must be one of {QUANTS}, got {self.quant!r}")
        if self.w13.dim() != 3 or self.w2.dim() != 3 or self.w13.shape[1] % 2:
            raise ValueError(f"expected w13 [E, 2I, H] and w2 [E, H, I], got {tuple(self.w13.shape)} "
                             f"and {tuple(self.w2.shape)}")
        e, two_i, h = self.w13.shape
        i = two_i // 2
        if tuple(self.w2.shape) != (e, h, i):
            raise ValueError(f"w2 must be [E, H, I] = {(e, h, i)} to match w13, got {tuple(self.w2.shape)}")
        if self.w13.stride(-1) != 1 or self.w2.stride(-1) != 1:
            raise ValueError("expert weights need a contiguous last (input) dimension; call .contiguous()")
        for name, shape in zip(("w13_scale", "w2_scale"), scale_shapes(e, h, i, self.quant)):
            got = getattr(self, name)
            if shape is None and got is not None:
                raise ValueError(f"{name} is only for quantised weights (quant={self.quant!r})")
            if shape is not None and (got is None or tuple(got.shape) != shape):
                raise ValueError(f"{name} must be {shape} for quant={self.quant!r}, got "
                                 f"{None if got is None else tuple(got.shape)}")
        dtypes = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
        if self.quant in dtypes and (self.w13.dtype, self.w2.dtype) != (dtypes[self.quant],) * 2:
            raise ValueError(f"quant={self.quant!r} needs {dtypes[self.quant]} weights, got {self.w13.dtype}")

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    def to(self, device: torch.device | str) -> "ExpertWeights":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return ExpertWeights(move(self.w13), move(self.w2), move(self.w13_scale), move(self.w2_scale), self.quant)


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> (e4m3 weight, scale_inv [..., ceil(N/128), ceil(K/128)]): DeepSeek-V3's format."""
    n, k = w.shape[-2:]
    nb, kb = _cdiv(n, BLOCK), _cdiv(k, BLOCK)
    padded = torch.nn.functional.pad(w.float(), (0, kb * BLOCK - k, 0, nb * BLOCK - n))
    blocks = padded.unflatten(-1, (kb, BLOCK)).unflatten(-3, (nb, BLOCK))  # [..., nb, 128, kb, 128]
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [..., nb, kb]
    scale = amax / 448.0
    q = (blocks / scale[..., :, None, :, None]).clamp(-448.0, 448.0)
    q = q.flatten(-2).flatten(-3, -2)[..., :n, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def quantize_int8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> (int8 weight, float32 scale [..., N]), symmetric per output row."""
    scale = w.float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_experts(weights: ExpertWeights, quant: str) -> ExpertWeights:
    """Quantise unquantised expert weights to 'fp8' (128x128 blocks) or 'int8' (per channel)."""
    if weights.quant != "bf16":
        raise ValueError(f"weights are already quantised ({weights.quant}); quantise from bf16")
    if quant not in ("fp8", "int8"):
        raise ValueError(f"quant must be 'fp8' or 'int8', got {quant!r}")
    i = weights.intermediate_size
    parts = []
    # A few experts at a time: the float32 temporaries of a whole DeepSeek-V3 layer would be ~30 GB.
    for lo in range(0, weights.num_experts, 8):
        w13, w2 = weights.w13[lo:lo + 8], weights.w2[lo:lo + 8]
        if quant == "fp8":
            (gq, gs), (uq, us) = quantize_fp8_block(w13[:, :i]), quantize_fp8_block(w13[:, i:])
            parts.append((torch.cat([gq, uq], 1), *quantize_fp8_block(w2), torch.cat([gs, us], 1)))
        else:
            q13, s13 = quantize_int8_channel(w13)
            parts.append((q13, *quantize_int8_channel(w2), s13))
    q13, q2, s2, s13 = (torch.cat(list(x)) for x in zip(*parts))
    return ExpertWeights(q13, q2, s13, s2, quant)


def stack_experts(
    gate: Sequence[torch.Tensor],
    up: Sequence[torch.Tensor],
    down: Sequence[torch.Tensor],
    gate_scale: Sequence[torch.Tensor] | None = None,
    up_scale: Sequence[torch.Tensor] | None = None,
    down_scale: Sequence[torch.Tensor] | None = None,
) -> ExpertWeights:
    """Per-expert checkpoint tensors (gate [I, H], up [I, H], down [H, I] each) into ExpertWeights.

    The format follows the weights' dtype: float8_e4m3fn takes 128x128 `weight_scale_inv` tensors,
    int8 takes per-row `weight_scale` tensors ([N] or [N, 1]); float weights take no scales.
    """
    if not (len(gate) == len(up) == len(down)) or not gate:
        raise ValueError("gate, up and down need one tensor per expert, the same number of each")
    w13 = torch.stack([torch.cat([g, u], 0) for g, u in zip(gate, up)])
    w2 = torch.stack(list(down)).contiguous()
    dtype = gate[0].dtype
    if dtype in (torch.float8_e4m3fn, torch.int8):
        if gate_scale is None or up_scale is None or down_scale is None:
            raise ValueError(f"{dtype} expert weights need their scales (gate_scale, up_scale, down_scale)")
        flat = (lambda s: s.float().reshape(-1)) if dtype == torch.int8 else (lambda s: s.float())
        s13 = torch.stack([torch.cat([flat(g), flat(u)], 0) for g, u in zip(gate_scale, up_scale)])
        s2 = torch.stack([flat(d) for d in down_scale])
        return ExpertWeights(w13, w2, s13, s2, "fp8" if dtype == torch.float8_e4m3fn else "int8")
    return ExpertWeights(w13, w2)


def load_experts(tensors: Mapping[str, torch.Tensor], prefix: str, expert_ids: Sequence[int]) -> ExpertWeights:
    """The experts `expert_ids` of one layer from checkpoint tensors named
    `{prefix}.{e}.{gate_proj|up_proj|down_proj}.weight` (or Mixtral's w1/w3/w2), with
    `.weight_scale_inv` (FP8 block) or `.weight_scale` (INT8 per channel) beside them when quantised.
    Local expert j of the result is checkpoint expert expert_ids[j]."""
    first = f"{prefix}.{expert_ids[0]}."
    names = next((n for n in _CHECKPOINT_NAMES if f"{first}{n[0]}.weight" in tensors), None)
    if names is None:
        raise KeyError(f"no expert weights under {first!r}: expected {first}gate_proj.weight or {first}w1.weight")
    parts: dict[str, list[torch.Tensor]] = {}
    for role, name in zip(("gate", "up", "down"), names):
        parts[role] = [tensors[f"{prefix}.{e}.{name}.weight"] for e in expert_ids]
        for suffix in ("weight_scale_inv", "weight_scale"):
            key = f"{prefix}.{expert_ids[0]}.{name}.{suffix}"
            if key in tensors:
                parts[f"{role}_scale"] = [tensors[f"{prefix}.{e}.{name}.{suffix}"] for e in expert_ids]
    return stack_experts(**parts)
