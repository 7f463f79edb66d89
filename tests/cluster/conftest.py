"""Fixtures of the cluster tests."""

from __future__ import annotations

import asyncio

import pytest


def wait_dead(actor, timeout_s: float = 60.0) -> None:
    """Wait until a killed actor is dead (its name free again): the next test of a module may start
    an actor of the same name on the same Ray, and start_controller joins a live one of that name."""
    import time

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except RayActorError:
            return
        except GetTimeoutError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"actor {actor} still alive {timeout_s:.0f}s after it was killed")
        time.sleep(0.1)


@pytest.fixture
def actor_gone():
    """`actor_gone(handle)`: wait_dead, for tests' own fixtures."""
    return wait_dead


@pytest.fixture(scope="module")
def private_ray(ray_cluster):
    """A Ray as fresh as one of this module's own (tests/ray_session.py; an embedded serve backend joins it), on one
    torch thread (`ray_cluster`); the admin API on a free port. Its tests share it: each stops (and waits out) the
    controller and groups it started."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOESERVE_ADMIN_PORT", "0")
        yield


@pytest.fixture
async def embedded_serve(private_ray, demo_model_dir):
    """Factory: `await embedded_serve(*flags)` -> (server, telemetry or None, control plane) of `moeserve serve
    --model <demo> --port 0 *flags` in this process, flags asking for Ray expert groups. After the test the
    edge, its pollers and admin API, and the controller with its groups are stopped."""
    import ray

    from moeserve.cluster.cli import build_parser
    from moeserve.cluster.cli.serve import start_server

    started = []

    async def start(*flags: str):
        serving = await start_server(build_parser().parse_args(
            ["serve", "--model", str(demo_model_dir), "--port", "0", *flags]))
        started.append(serving)
        return serving.server, serving.telemetry, serving.control_plane

    yield start
    for serving in started:
        controller = serving.control_plane.controller
        # Its autoscaler, poller and admin API too; serve's at-exit stops of them then do nothing (none starts a
        # new local Ray to reach the controller of the Ray this module shut down)
        await serving.stop(0)
        backend = getattr(serving.server.engine, "experts_backend", None)
        if backend is not None:  # the trunk in this process: its dispatcher leaves the controller
            backend.close()
        ray.get(controller.shutdown.remote(), timeout=60)
        ray.kill(controller)
        await asyncio.to_thread(wait_dead, controller)
