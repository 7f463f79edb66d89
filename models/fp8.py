"""Block-scaled FP8 (e4m3) weights as DeepSeek-V3/R1 store them: `weight` plus `weight_scale_inv`.

Dequantisation is kernels.reference.block_dequant; this file holds the inverse, used to write FP8
checkpoints (demo presets, tests) and to decide which tensors the release quantises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0


def is_quantised_in_release(name: str) -> bool:
    """DeepSeek's FP8 release quantises every linear projection; embeddings, norms, gate and lm_head stay."""
    return name.endswith(("proj.weight", "proj_with_mqa.weight")) and not name.startswith("lm_head")


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight [N, K], float32 scale_inv [ceil(N/bn), ceil(K/bk)]) with weight ~= q * scale_inv per block."""
    bn, bk = block
    n, k = weight.shape
    rows, cols = -(-n // bn), -(-k // bk)
    padded = F.pad(weight.float(), (0, cols * bk - k, 0, rows * bn - n))
    blocks = padded.view(rows, bn, cols, bk)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    q = q.view(rows * bn, cols * bk)[:n, :k].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.contiguous()
