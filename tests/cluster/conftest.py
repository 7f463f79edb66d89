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
