"""moeserve.chaos: fault-injection runs against a live embedded cluster, counting what was lost.

A scenario (scenarios.py) starts a cluster (cluster.py), drives steady gRPC load (load.py) whose
greedy outputs are known from a fault-free run (workload.py), injects one kind of fault again and
again (faults.py), and reports sent / succeeded / failed / lost / mismatched and p99 latency during
the faults (report.py). `moeserve chaos SCENARIO|all` runs them (runner.py).
"""
