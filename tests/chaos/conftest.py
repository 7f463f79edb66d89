"""One real Ray instance for the chaos tests, started and shut down here (never `ray stop`).

Fixtures that compute reference outputs depend on `ray_cluster` so they run on its one BLAS thread.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of our own per module, so the next module (or folder) can start its own."""
    from moeserve.chaos.runner import ray_running, torch_threads

    # One BLAS thread here, as in the chaos cluster's trunk and groups (equal bits, no spinning pools).
    with torch_threads(1), ray_running(num_cpus=2):
        yield
