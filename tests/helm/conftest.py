"""Fixtures of the chart tests: the real helm binary, and `helm template` runs on the chart."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chart_harness import CHART, NAMESPACE, RELEASE, run_helm
from helm_binary import HelmUnavailable, helm_binary


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return helm_binary()
    except HelmUnavailable as exc:
        pytest.fail(f"the chart tests need the real helm: {exc}", pytrace=False)


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
