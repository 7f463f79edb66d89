"""Fixtures of the cluster tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def private_ray(request, tmp_path_factory, monkeypatch):
    """A Ray instance of this test's own (an embedded serve backend joins it); the admin API on a free port.

    One torch thread meanwhile: the trunk and the expert groups share the machine's two cores.
    """
    import ray
    import torch

    monkeypatch.setenv("MOESERVE_ADMIN_PORT", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False,
             namespace=request.module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


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
        await serving.stop(0)
        backend = getattr(serving.server.engine, "experts_backend", None)
        if backend is not None:  # the trunk in this process: its dispatcher leaves the controller
            backend.close()
        ray.get(controller.shutdown.remote(), timeout=60)
        ray.kill(controller)
