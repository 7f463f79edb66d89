"""Per-expert token counts and busy time over a sliding window, with an explicit clock."""

from __future__ import annotations

import numpy as np
import pytest

from moeserve.experts.load import LoadWindow


def test_counts_map_local_ids_to_logical_experts_and_expire():
    w = LoadWindow(window_s=10.0, bucket_s=1.0)
    w.record(100.2, 1, np.array([3, 0, 2]), busy_s=0.5)
    w.record(100.7, 2, np.array([1, 4]), busy_s=0.25)
    w.record(105.0, 1, np.array([1, 1, 1, 7]), busy_s=1.0)  # a fourth expert added since
    snap = w.snapshot(105.5, experts=(10, 11, 12, 13))
    assert snap["per_layer"] == {1: {10: 4, 11: 1, 12: 3, 13: 7}, 2: {10: 1, 11: 4}}
    assert snap["rows"] == 20 and snap["busy_s"] == pytest.approx(1.75)
    assert snap["busy_share"] == pytest.approx(1.75 / 5.3)
    later = w.snapshot(112.0, experts=(10, 11, 12, 13))  # the 100 s bucket left the window
    assert later["per_layer"] == {1: {10: 1, 11: 1, 12: 1, 13: 7}}
    assert later["total_rows"] == 20 and later["rows"] == 10


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="bucket_s"):
        LoadWindow(window_s=1.0, bucket_s=2.0)
    with pytest.raises(ValueError, match="window_s"):
        LoadWindow(window_s=0.0)
