"""The chaos tests' Ray: the one lent to test modules (tests/ray_session.py; never `ray stop`).

Fixtures that compute reference outputs depend on `ray_cluster` so they run on its one BLAS thread.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster(shared_ray):
    """A local Ray (2 CPUs), as fresh as a new one, for the module."""
    from moeserve.chaos.runner import torch_threads

    # One BLAS thread here, as in the chaos cluster's trunk and groups (equal bits, no spinning pools).
    with torch_threads(1):
        yield
