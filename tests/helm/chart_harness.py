"""Shared pieces of the chart tests: where the chart is, running helm, picking rendered objects.

(A module of its own, not conftest.py: other test folders have a conftest too, and a test module
importing `conftest` could get theirs.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moeserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "inference"
NAMESPACE = "llm"


class HelmFailed(AssertionError):
    """helm exited non-zero; the message carries its stderr."""


def run_helm(helm: Path, *args: str) -> str:
    out = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise HelmFailed(out.stderr.strip() or out.stdout.strip())
    return out.stdout


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


CI = CHART / "ci"
MINIMAL, MULTI_GPU, TLS_AUTH_MON = (CI / f"{n}-values.yaml" for n in ("minimal-cpu", "multi-gpu", "tls-auth-monitoring"))
TRUNK_WORKERS = CI / "trunk-workers-values.yaml"  # trunk.mode workers: the edge on the head
FULLNAME = f"{RELEASE}-moeserve"


def worker_groups(objects: list[dict]) -> dict[str, dict]:
    """The RayCluster's worker groups by name, trunk first."""
    (cluster,) = by_kind(objects, "RayCluster")
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
