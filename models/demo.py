"""Deterministic random checkpoints: the embedded demo model and real-size presets for benchmarks.

Each tensor's values depend only on (seed, tensor name), so shards are generated and written one at
a time: a real-size preset never holds more than one shard in memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .demo_presets import DEFAULT_DTYPE, DEFAULT_INIT_STD, PRESETS
from .demo_tokenizer import BOS, EOS, train_demo_tokenizer
from .fp8 import is_quantised_in_release, quantize_block_fp8
from .registry import model_class

DEMO_VERSION = "2"
# A plain chat format for the demo (its weights are random: the replies are not meant to make sense).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")  # bump when the demo checkpoint's content changes, so caches are rebuilt
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8_BLOCK = (128, 128)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _tensor_specs(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor, trunk and routed experts (per-expert layout), in file order."""
    cls = model_class(config)
    with torch.device("meta"):
        specs = [(n, tuple(t.shape)) for n, t in cls(config).state_dict().items()]
    h, i = config.hidden_size, config.moe.moe_intermediate_size
    g, u, d = cls.expert_proj_names
    for layer in config.moe.moe_layer_ids:
        prefix = cls.expert_prefix.format(layer=layer)
        for e in range(config.moe.n_routed_experts):
            specs += [(f"{prefix}.{e}.{g}.weight", (i, h)), (f"{prefix}.{e}.{u}.weight", (i, h)),
                      (f"{prefix}.{e}.{d}.weight", (h, i))]

    def order(spec):
        m = _LAYER.search(spec[0])
        return (int(m.group(1)) if m else (-1 if "embed_tokens" in spec[0] else 1 << 30), spec[0])

    return sorted(specs, key=order)


def _value(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return torch.randn(shape, generator=gen) * std


def _encode(name: str, value: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "fp8" and is_quantised_in_release(name):
        q, scale_inv = quantize_block_fp8(value, FP8_BLOCK)
        return {name: q, name + "_scale_inv": scale_inv}
    store = torch.bfloat16 if dtype == "fp8" else DTYPES[dtype]
    # The router stays float32 on disk, as in DeepSeek's releases.
    return {name: value if name.endswith((".gate.weight", "e_score_correction_bias")) else value.to(store)}


def _stored_bytes(name: str, shape: tuple[int, ...], dtype: str) -> int:
    n = 1
    for s in shape:
        n *= s
    if dtype == "fp8" and is_quantised_in_release(name):
        return n + 4 * (-(-shape[0] // FP8_BLOCK[0])) * (-(-shape[1] // FP8_BLOCK[1]))
    return n * (2 if dtype in ("bfloat16", "float16", "fp8") else 4)


def preset_config(preset: str, config_override: dict | None = None) -> dict:
    """The HF config.json dict of `preset` with `config_override` merged in (validated)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = {k: v for k, v in {**PRESETS[preset], **(config_override or {})}.items() if v is not None}
    ModelConfig.from_hf(cfg)
    return cfg


def write_demo_model(
    path: str | Path,
    *,
    seed: int = 0,
    preset: str = "demo",
    config_override: dict | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write config.json, safetensors (sharded above max_shard_bytes), generation_config.json and tokenizer.json."""
    dtype = dtype or DEFAULT_DTYPE.get(preset, "bfloat16")
    if dtype not in (*DTYPES, "fp8"):
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join((*DTYPES, 'fp8'))}")
    path = Path(path)
    if (path / "config.json").exists():
        raise FileExistsError(f"{path} already holds a checkpoint; choose an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_demo_tokenizer()
    hf = preset_config(preset, {"bos_token_id": tokenizer.token_to_id(BOS), "eos_token_id": tokenizer.token_to_id(EOS),
                                **({"vocab_size": tokenizer.get_vocab_size()} if preset == "demo" else {}),
                                **(config_override or {})})
    if dtype == "fp8":
        if not hf["model_type"].startswith("deepseek"):
            raise ValueError("dtype 'fp8' follows DeepSeek-V3's block-scaled release; use a deepseek preset")
        hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(FP8_BLOCK)}
    hf["torch_dtype"] = "bfloat16" if dtype == "fp8" else dtype
    config = ModelConfig.from_hf(hf)
    std = DEFAULT_INIT_STD.get(preset, 0.02)

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in _tensor_specs(config):
        nbytes = _stored_bytes(*spec, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for file, shard in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in shard:
            tensors.update(_encode(name, _value(name, shape, seed, std), dtype))
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save(str(path / "tokenizer.json"))
    tok_cfg = {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
               "model_max_length": hf["max_position_embeddings"], "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return path


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moeserve" / f"demo-{DEMO_VERSION}"


def local_model_path(path: str) -> str:
    """`path` as this machine has it. A process on another node (a trunk worker, an expert group) gets the
    edge's path to the demo checkpoint, which is only in the edge's cache: when that path is missing
    here and names the demo's cache directory, this machine's demo checkpoint stands in (written on
    first use; it is seeded, so every machine writes the same tensors). Any other path is returned as it is.
    """
    p = Path(path)
    if (p / "config.json").is_file() or p.name != default_cache_dir().name:
        return path
    return str(ensure_demo_model())


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """The demo checkpoint's directory, written (atomically: temp dir, then rename) on first use."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_demo_model(tmp / "model")
        try:
            os.rename(tmp / "model", target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
