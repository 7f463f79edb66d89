"""Fixtures shared by every test folder (this file only adds; see tests/checkpoints.py for builders, and
tests/ray_session.py for the Ray lent to the modules that need a plain one)."""

from __future__ import annotations

from pathlib import Path

import pytest

_RAY_SESSION = pytest.StashKey()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: `hf_checkpoint("mixtral", seed=0, **config_overrides) -> Path` of a tiny HF checkpoint.

    Built once per distinct arguments per session; treat the directory as read-only.
    """
    from checkpoints import build_checkpoint

    cache: dict[tuple, Path] = {}

    def make(arch: str, seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-ckpt")
            cache[key] = build_checkpoint(path, arch, seed, **overrides)[0]
        return cache[key]

    return make


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The embedded demo model (DeepSeek-V3 architecture, with tokenizer), written once per session."""
    from moeserve.models.demo import write_demo_model

    path = tmp_path_factory.mktemp("demo-model") / "demo"
    write_demo_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def _ray_session(request, tmp_path_factory):
    from ray_session import RaySession

    session = RaySession(lambda: tmp_path_factory.mktemp("ray"))
    request.config.stash[_RAY_SESSION] = session
    yield session
    session.stop()


@pytest.fixture(scope="module")
def shared_ray(request, _ray_session):
    """A local Ray (2 CPUs, no custom resources) for this module, as fresh as a newly started one: the session's,
    started once for all the modules that ask for it and checked after each (tests/ray_session.py)."""
    _ray_session.acquire()
    yield
    _ray_session.release(request.module.__name__)


def pytest_collection_modifyitems(items):
    """The modules using `shared_ray` run last, one after another (each keeps its own order): the lent Ray starts
    once for all of them, and the modules that start a Ray of their own run before it is up."""
    borrowers = {item.path for item in items if "shared_ray" in getattr(item, "fixturenames", ())}
    items[:] = [i for i in items if i.path not in borrowers] + [i for i in items if i.path in borrowers]


def pytest_terminal_summary(terminalreporter, config):
    session = config.stash.get(_RAY_SESSION, None)
    if session is not None:
        terminalreporter.write_line(session.summary())
