"""Fixtures of the chart tests: the real helm binary, and `helm template` / `helm lint` runs on the chart."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from helm_binary import HelmUnavailable, helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moeserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "inference"
NAMESPACE = "llm"


class HelmFailed(AssertionError):
    """helm exited non-zero; the message carries its stderr."""


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return helm_binary()
    except HelmUnavailable as exc:
        pytest.fail(f"the chart tests need the real helm: {exc}", pytrace=False)


def run_helm(helm: Path, *args: str) -> str:
    out = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise HelmFailed(out.stderr.strip() or out.stdout.strip())
    return out.stdout


@pytest.fixture(scope="session")
def render(helm):
    """`render(values_file=None, *extra helm args) -> list of objects`, cached per argument list."""
    cache: dict[tuple, list[dict]] = {}

    def _render(values: Path | None = None, *extra: str) -> list[dict]:
        key = (values, extra)
        if key not in cache:
            args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
            if values is not None:
                args += ["-f", str(values)]
            text = run_helm(helm, *args, *extra)
            cache[key] = [doc for doc in yaml.safe_load_all(text) if doc]
        return cache[key]

    return _render


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]
