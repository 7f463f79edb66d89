"""The chaos suite's counting: how a request's end is classified, p99, and which requests overlap a fault."""

from __future__ import annotations

from moeserve.chaos.report import (EXPIRED, FAILED, LOST, MISMATCHED, SUCCEEDED, FaultRecord, Outcome, build_report,
                                   classify, percentile)


def _o(i=0, start=0.0, end=1.0, tokens=(1, 2), finish="length", code="OK"):
    return Outcome(index=i, prompt_index=0, start=start, end=end, tokens=list(tokens), finish_reason=finish, code=code)


def test_classify_every_ending():
    want = [1, 2]
    assert classify(_o(), want) == SUCCEEDED
    assert classify(_o(tokens=(1, 3)), want) == MISMATCHED
    assert classify(_o(tokens=(1,)), want) == MISMATCHED
    assert classify(_o(code="UNAVAILABLE", finish=None), want) == FAILED
    assert classify(_o(finish="cancelled"), want) == FAILED
    assert classify(_o(code="DEADLINE_EXCEEDED", finish=None), want) == EXPIRED
    assert classify(_o(end=None, finish=None), want) == LOST  # never answered
    assert classify(_o(finish=None), want) == LOST  # clean end without a finish reason


def test_percentile_nearest_rank():
    assert percentile([], 99) is None
    assert percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 99) == 99.0
    assert percentile(values, 50) == 50.0
    assert percentile(list(reversed(values)), 100) == 100.0


def test_report_counts_and_splits_latency_by_fault_window():
    expected = [[1, 2]]
    outcomes = [
        _o(0, 0.0, 1.0),  # before the fault
        _o(1, 1.5, 9.0),  # spans it
        _o(2, 2.5, 3.0, tokens=(2, 2)),  # inside it, wrong tokens
        _o(3, 4.0, None, finish=None),  # lost
        _o(4, 5.0, 5.5, code="INTERNAL", finish=None),
        _o(5, 6.0, 7.0, code="DEADLINE_EXCEEDED", finish=None),
    ]
    fault = FaultRecord("kill-expert-group", "g0r0", 2.0, 4.0)
    r = build_report("s", outcomes, expected, [fault], duration_s=10.0)
    assert (r.sent, r.succeeded, r.mismatched, r.lost, r.failed, r.expired) == (6, 2, 1, 1, 1, 1)
    assert r.p99_during_faults_s == 7.5 and r.p99_without_faults_s == 1.0
    assert r.mean_recovery_s == 2.0 and not r.ok
    assert "FAIL" in r.format() and "request 2 mismatched" in r.format()
    assert "each fault: g0r0 2.0s" in r.format()


def test_clean_run_passes_and_fault_errors_fail_it():
    outcomes = [_o(i) for i in range(3)]
    assert build_report("s", outcomes, [[1, 2]], [], 1.0).ok
    bad = build_report("s", outcomes, [[1, 2]], [], 1.0, fault_errors=["kill-controller #1: TimeoutError()"])
    assert not bad.ok and "fault: kill-controller" in bad.format()


def test_expired_alone_does_not_fail_the_bar():
    r = build_report("s", [_o(0), _o(1, code="DEADLINE_EXCEEDED", finish=None)], [[1, 2]], [], 1.0)
    assert r.ok and r.expired == 1
