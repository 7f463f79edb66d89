"""The cluster the simulator replays traffic through: shapes, costs and start-up times, from YAML.

docs/autoscaling.md states the model's assumptions; `cluster/configs/cluster-model.yaml` holds the
defaults with where each number comes from. Measure your own deployment and write them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..schema import ConfigError, parse, spec


@dataclass(frozen=True, slots=True)
class ModelShape:
    layers: int = spec(48, ge=1, le=512, doc="MoE layers")
    experts: int = spec(128, ge=2, le=4096, doc="routed experts per layer")
    top_k: int = spec(8, ge=1, le=64, doc="experts picked per token")
    zipf: float = spec(0.25, ge=0, le=4, doc="base popularity of experts in a layer ~ rank^-zipf (0: uniform)")
    seed: int = spec(7, ge=0, doc="seed of the per-layer popularity order")

    def __post_init__(self) -> None:
        if self.top_k > self.experts:
            raise ConfigError("top_k", f"{self.top_k} is above experts {self.experts}; allowed: <= experts")


@dataclass(frozen=True, slots=True)
class TrunkModel:
    gpus_per_replica: int = spec(1, ge=0, le=64, doc="GPUs one trunk worker holds")
    startup_s: float = spec(90.0, ge=0, le=3600, doc="from the decision to serving: pod or actor start, weight load")
    max_sequences: int = spec(128, ge=1, le=100000, doc="batch slots per trunk worker (bounded by KV-cache memory)")
    step_token_budget: int = spec(768, ge=1, le=1000000, doc="tokens per step per trunk worker, decode first, prefill chunks fill the rest")
    step_overhead_s: float = spec(0.010, ge=0, le=10, doc="trunk time per step independent of batch (weights read, sampling)")
    prefill_token_s: float = spec(5e-5, ge=0, le=1, doc="trunk time per prompt token in a step")
    decode_token_s: float = spec(4e-4, ge=0, le=1, doc="trunk time per decoding sequence in a step (KV-cache reads included)")
    initial_replicas: int = spec(1, ge=1, le=4096, doc="replicas at the start of the replay")

    def __post_init__(self) -> None:
        if self.max_sequences > self.step_token_budget:
            raise ConfigError(
                "max_sequences", f"{self.max_sequences} is above step_token_budget {self.step_token_budget}; every running sequence needs a token per step"
            )


@dataclass(frozen=True, slots=True)
class ExpertGroupsModel:
    count: int = spec(8, ge=1, le=1024, doc="expert groups g0..g{count-1}, each holding a contiguous block of experts")
    gpus_per_replica: int = spec(1, ge=0, le=64, doc="GPUs one expert-group replica holds")
    startup_s: float = spec(60.0, ge=0, le=3600, doc="from the decision to serving")
    layer_overhead_s: float = spec(6e-4, ge=0, le=1, doc="per MoE layer per step on one replica: expert weights read, dispatch and combine")
    row_s: float = spec(2e-7, ge=0, le=1, doc="per token row per MoE layer on one replica")
    redundant_slots: int = spec(4, ge=0, le=4096, doc="extra expert copies one group can host beside its own experts")
    copy_s: float = spec(10.0, ge=0, le=3600, doc="time to load a redundant copy before it takes rows")
    initial_replicas: int = spec(1, ge=1, le=4096, doc="replicas of every group at the start of the replay")


@dataclass(frozen=True, slots=True)
class ClusterModel:
    model: ModelShape = spec(default_factory=ModelShape)
    trunk: TrunkModel = spec(default_factory=TrunkModel)
    expert_groups: ExpertGroupsModel = spec(default_factory=ExpertGroupsModel)
    tick_s: float = spec(0.25, gt=0, le=10, doc="simulation tick: admission and batch changes happen at tick edges")
    drain_s: float = spec(900.0, ge=0, le=86400, doc="after the last arrival, run this long for requests to finish")

    def __post_init__(self) -> None:
        if self.expert_groups.count > self.model.experts:
            raise ConfigError("expert_groups.count", f"{self.expert_groups.count} is above model.experts {self.model.experts}")

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(f"g{i}" for i in range(self.expert_groups.count))

    def placement(self) -> dict[str, tuple[int, ...]]:
        """Contiguous, near-equal blocks of logical experts per group."""
        blocks = np.array_split(np.arange(self.model.experts), self.expert_groups.count)
        return {name: tuple(int(e) for e in block) for name, block in zip(self.group_names, blocks)}

    def base_popularity(self) -> np.ndarray:
        """[layer, expert] routing probabilities: Zipf over a per-layer random order, rows sum to 1."""
        m = self.model
        rng = np.random.default_rng(m.seed)
        weights = (np.arange(1, m.experts + 1, dtype=float)) ** -m.zipf
        out = np.empty((m.layers, m.experts))
        for layer in range(m.layers):
            out[layer, rng.permutation(m.experts)] = weights
        return out / out.sum(axis=1, keepdims=True)


def load_cluster_model(path: str | Path) -> ClusterModel:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("", f"cannot read cluster model {path}: {exc.strerror}") from None
    try:
        return parse(ClusterModel, data)
    except ConfigError as exc:
        raise ConfigError(exc.path, f"{str(exc).split(': ', 1)[-1]} (in {path})") from None
