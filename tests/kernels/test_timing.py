"""kernels/timing.runoff: the autotuner's side-by-side decision between two timed options."""

import itertools

from moeserve.kernels.timing import runoff


def drifting(base: float, clock):
    """A timer whose readings grow with every reading of any timer sharing the clock (a GPU warming
    up over the run), on top of the option's own time."""
    return lambda: base + 0.1 * next(clock)


def test_interleaved_rounds_cancel_drift():
    """Timed one after the other, the later option would look slower by the drift alone; interleaved,
    the faster one wins and each median carries the same drift."""
    clock = itertools.count()
    winner, medians = runoff({"current": drifting(16.1, clock), "new": drifting(15.9, clock)}, rounds=3)
    assert winner == "new"
    assert abs((medians["current"] - medians["new"]) - 0.1) < 1e-9  # 0.2 apart, less one step of drift


def test_one_slow_round_does_not_decide():
    readings = {"current": iter([10.0, 10.0, 10.0]), "new": iter([9.0, 30.0, 9.0])}
    winner, medians = runoff({name: lambda it=it: next(it) for name, it in readings.items()}, rounds=3)
    assert winner == "new" and medians == {"current": 10.0, "new": 9.0}


def test_ties_keep_the_first_option():
    winner, _ = runoff({"current": lambda: 5.0, "new": lambda: 5.0})
    assert winner == "current"
