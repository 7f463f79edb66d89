"""One real Ray instance for the chaos tests, started and shut down here (never `ray stop`)."""

from __future__ import annotations

import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance of our own (short temp dir: Ray's socket paths must stay short)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    tmp = tempfile.mkdtemp(prefix="rch", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
