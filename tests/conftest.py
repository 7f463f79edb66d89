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


@pytest.fixture(scope="module")
def ray_cluster(shared_ray):
    """The lent Ray with this process's torch on one BLAS thread, as the Ray trunk and expert groups run (equal bits,
    and no OpenMP pools spinning against each other on two cores). Fixtures that compute reference outputs depend on
    it so that they run on that one thread too. test_controller has a Ray of its own under this name."""
    from moeserve.chaos.runner import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def no_lent_ray(_ray_session):
    """For a module with a Ray of its own that may run after borrowers in this process (an OWN_PORTS module under
    xdist, tests/ray_session.py): the lent Ray, if up, is shut down first; the next borrower starts a new one."""
    if _ray_session.up:
        _ray_session.stop()


def pytest_collection_modifyitems(items):
    from ray_session import order

    order(items)


# -- pytest-xdist: `make test` runs two workers (tests/ray_session.py says how the Ray tests share them) -----------

_WORKER_SUMMARIES = pytest.StashKey()
_SHORT_BASETEMP = pytest.StashKey()
_current_item = None


def _xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)  # before the tmp_path plugin reads --basetemp
def pytest_configure(config):
    # A worker's temp dir is <basetemp>/popen-gwN: under the default basetemp (/tmp/pytest-of-<user>/pytest-<N>) a
    # Ray session's socket paths in it come within a byte or two of AF_UNIX's 107, past it once N has 4 digits.
    if _xdist_controller(config) and config.option.basetemp is None:
        import tempfile

        config.option.basetemp = config.stash[_SHORT_BASETEMP] = tempfile.mkdtemp(prefix="pytest-", dir="/tmp")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from ray_session import xdist_scheduler

    return xdist_scheduler(config, log)


def pytest_collection_finish(session):
    from ray_session import starts_ray

    # A module that borrows the lent Ray must be in a chain, or under xdist it would start a Ray beside the other
    # worker's whenever it happens to run first on its worker: say so at collection, whatever the scheduling.
    unlisted = sorted({item.nodeid.split("::")[0] for item in session.items
                       if "shared_ray" in getattr(item, "fixturenames", ()) and not starts_ray(item.nodeid)})
    if unlisted:
        raise pytest.UsageError(f"{', '.join(unlisted)}: borrow the lent Ray but are not in RAY_MODULES; add them to a "
                                "chain in tests/ray_session.py")
    if hasattr(session.config, "workerinput"):
        from ray_session import free_agent_port, guard_ray_init

        guard_ray_init(lambda: _current_item is not None and starts_ray(_current_item.nodeid))
        free_agent_port()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    global _current_item
    _current_item = item
    yield
    _current_item = None


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    ray_session = config.stash.get(_RAY_SESSION, None)
    if hasattr(config, "workeroutput") and ray_session is not None:
        config.workeroutput["ray_session"] = ray_session.summary()
    basetemp = config.stash.get(_SHORT_BASETEMP, None)
    if basetemp is not None and exitstatus == 0:  # kept after a failure, as pytest keeps its own
        import shutil

        shutil.rmtree(basetemp, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    summary = getattr(node, "workeroutput", {}).get("ray_session")
    if summary:
        node.config.stash.setdefault(_WORKER_SUMMARIES, []).append(f"[{node.gateway.id}] {summary}")


def pytest_terminal_summary(terminalreporter, config):
    session = config.stash.get(_RAY_SESSION, None)
    for line in [session.summary()] if session is not None else config.stash.get(_WORKER_SUMMARIES, []):
        terminalreporter.write_line(line)
    basetemp = config.stash.get(_SHORT_BASETEMP, None)
    if basetemp is not None and Path(basetemp).is_dir():
        terminalreporter.write_line(f"temporary files kept in {basetemp}")
