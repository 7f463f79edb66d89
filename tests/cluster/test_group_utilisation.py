"""The expert_group_utilisation gauge from the controller's status: each group's busy share, groups that
are gone forgotten (pure: status dicts in; the live poller over real serve traffic is in test_metrics.py)."""

from __future__ import annotations

import pytest

from moeserve.cluster.group_utilisation import GroupUtilisationPoller
from moeserve.cluster.telemetry import Telemetry


def _group(group_id: int, *replicas: tuple[str, float]) -> dict:
    """A group of ExpertController.status(): replicas as (state, busy share)."""
    return {"group_id": group_id, "experts": [group_id], "replicas": [
        {"replica_id": f"g{group_id}r{i}", "state": state, "serving": state == "serving", "busy_share": busy}
        for i, (state, busy) in enumerate(replicas)
    ]}


def test_each_group_exports_its_serving_replicas_mean_and_gone_groups_are_forgotten():
    tel = Telemetry()
    try:
        poller = GroupUtilisationPoller(controller=None, telemetry=tel)
        shares = poller.update({"groups": [
            _group(0, ("serving", 0.6), ("serving", 0.2), ("draining", 0.9)),
            _group(1, ("serving", 0.3)),
            _group(2, ("starting", 0.0)),
        ]})
        assert shares == pytest.approx({"g0": 0.4, "g1": 0.3, "g2": 0.0})
        assert tel.snapshot()["expert_group_utilisation"] == pytest.approx({"group=g0": 0.4, "group=g1": 0.3,
                                                                            "group=g2": 0.0})
        poller.update({"groups": [_group(0, ("serving", 1.0))]})  # groups 1 and 2 were removed
        assert tel.snapshot()["expert_group_utilisation"] == {"group=g0": 1.0}
    finally:
        tel.shutdown()


def test_poller_rejects_bad_periods():
    with pytest.raises(ValueError, match="interval_s"):
        GroupUtilisationPoller(None, None, interval_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        GroupUtilisationPoller(None, None, timeout_s=-1)
