"""What a policy decides: replica counts per scaled unit and extra copies of hot experts, with reasons."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .signals import Signals

TRUNK = "trunk"


@dataclass(frozen=True, slots=True)
class ScaleTarget:
    """Replicas wanted for one unit (trunk workers or an expert group) and why, in words."""

    replicas: int
    reason: str

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int):
            raise TypeError(f"replicas: expected an int, got {self.replicas!r}")
        if self.replicas < 0:
            raise ValueError(f"replicas: {self.replicas} is negative")
        if not self.reason:
            raise ValueError("reason: every scaling target needs a human-readable reason")


@dataclass(frozen=True, slots=True)
class Decision:
    """Targets for the trunk and each expert group, plus extra copies of hot experts."""

    trunk: ScaleTarget
    groups: Mapping[str, ScaleTarget]
    redundant: Mapping[int, int] = field(default_factory=dict)  # logical expert -> extra copies
    redundant_reason: str = "no hot experts"

    def __post_init__(self) -> None:
        for expert, copies in self.redundant.items():
            if copies < 0:
                raise ValueError(f"redundant[{expert}]: {copies} extra copies is negative")
        object.__setattr__(self, "groups", dict(self.groups))
        object.__setattr__(self, "redundant", {e: c for e, c in self.redundant.items() if c > 0})

    def targets(self) -> dict[str, ScaleTarget]:
        """All scaling targets by unit name, the trunk first."""
        return {TRUNK: self.trunk, **self.groups}

    def replicas(self) -> dict[str, int]:
        return {name: t.replicas for name, t in self.targets().items()}

    def changes(self, signals: Signals) -> list[str]:
        """One line per unit whose target differs from the cluster's current target, with its reason."""
        current = {TRUNK: signals.trunk.target, **{n: g.target for n, g in signals.groups.items()}}
        lines = [
            f"{name} {current.get(name, 0)} -> {t.replicas}: {t.reason}"
            for name, t in self.targets().items()
            if t.replicas != current.get(name, 0)
        ]
        if dict(self.redundant) != dict(signals.redundant):
            lines.append(f"redundant experts {_fmt(signals.redundant)} -> {_fmt(self.redundant)}: {self.redundant_reason}")
        return lines

    @classmethod
    def hold(cls, signals: Signals, reason: str = "no change") -> Decision:
        """Keep every unit at its current target."""
        return cls(
            trunk=ScaleTarget(signals.trunk.target, reason),
            groups={n: ScaleTarget(g.target, reason) for n, g in signals.groups.items()},
            redundant=dict(signals.redundant),
            redundant_reason=reason,
        )


def _fmt(redundant: Mapping[int, int]) -> str:
    if not redundant:
        return "{}"
    return "{" + ", ".join(f"e{e}+{c}" for e, c in sorted(redundant.items())) + "}"
