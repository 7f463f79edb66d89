"""The replay simulator: trace files, the cluster model, static and policy-driven replays."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from moeserve.cluster.autoscaling import parse_config
from moeserve.cluster.autoscaling.schema import ConfigError, parse
from moeserve.cluster.autoscaling.sim.engine import simulate, simulate_static
from moeserve.cluster.autoscaling.sim.model import ClusterModel, load_cluster_model
from moeserve.cluster.autoscaling.sim.trace import TraceError, load_trace, write_trace


def test_csv_and_jsonl_traces_read_the_same(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text(
        "# a comment line\n"
        "timestamp,prompt_tokens,output_tokens,expert_skew,extra\n"
        "10.5,100,20,,x\n"
        "10.0,50,5,3:4;1:2,y\n"
    )
    jsonl_path = tmp_path / "t.jsonl.gz"
    with gzip.open(jsonl_path, "wt") as f:
        f.write(json.dumps({"timestamp": 10.5, "prompt_tokens": 100, "output_tokens": 20}) + "\n\n")
        f.write(json.dumps({"timestamp": 10.0, "prompt_tokens": 50, "output_tokens": 5, "expert_skew": {"1": 2, "3": 4}}) + "\n")
    a, b = load_trace(csv_path), load_trace(jsonl_path)
    for t in (a, b):
        assert t.arrival_s.tolist() == [0.0, 0.5]  # sorted, shifted to start at 0
        assert t.prompt_tokens.tolist() == [50, 100] and t.output_tokens.tolist() == [5, 20]
        assert t.skews[t.skew_id[0]] == ((1, 2.0), (3, 4.0)) and t.skew_id[1] == 0
    assert a.name == "t" and len(a) == 2 and a.duration_s == 0.5


@pytest.mark.parametrize(
    "body, message",
    [
        ("timestamp,prompt_tokens\n1,2\n", "CSV header lacks ['output_tokens']"),
        ("timestamp,prompt_tokens,output_tokens\n1,0,5\n", ":2: need a finite timestamp and prompt_tokens, output_tokens >= 1"),
        ("timestamp,prompt_tokens,output_tokens\nsoon,1,5\n", ":2: timestamp must be a number"),
        ("timestamp,prompt_tokens,output_tokens,expert_skew\n1,1,5,7:-1\n", "needs expert >= 0 and weight > 0"),
        ("timestamp,prompt_tokens,output_tokens\n", "no arrivals"),
    ],
)
def test_bad_traces_name_the_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(TraceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_trace(path)


def test_write_trace_is_byte_identical(tmp_path):
    args = ([0.0, 1.25], [10, 20], [3, 4], ["", "5:2"])
    write_trace(tmp_path / "a.csv.gz", *args)
    write_trace(tmp_path / "b.csv.gz", *args)
    assert (tmp_path / "a.csv.gz").read_bytes() == (tmp_path / "b.csv.gz").read_bytes()
    assert load_trace(tmp_path / "a.csv.gz").skews[1] == ((5, 2.0),)


def test_cluster_model_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.top_k: 9 is above experts 4"):
        parse(ClusterModel, {"model": {"experts": 4, "top_k": 9}})
    path = tmp_path / "m.yaml"
    path.write_text("trunk: {startup_s: -1}\n")
    with pytest.raises(ConfigError, match=r"trunk.startup_s: -1.0 is out of range; allowed: >= 0 and <= 3600 \(in .*m.yaml\)"):
        load_cluster_model(path)


SMALL = {
    "model": {"layers": 4, "experts": 16, "top_k": 2},
    "trunk": {"startup_s": 20, "max_sequences": 16, "step_token_budget": 256},
    "expert_groups": {"count": 2, "startup_s": 10, "layer_overhead_s": 0.002, "copy_s": 5},
    "tick_s": 0.5,
    "drain_s": 120,
}


def _trace(tmp_path, rates: list[tuple[float, float]], seed: int = 0, prompt: int = 200, output: int = 40):
    """Poisson arrivals: a list of (duration_s, rate per s) phases."""
    rng = np.random.default_rng(seed)
    times, t0 = [], 0.0
    for duration, rate in rates:
        n = rng.poisson(rate * duration)
        times.extend(sorted(t0 + rng.uniform(0, duration, n)))
        t0 += duration
    n = len(times)
    path = tmp_path / "trace.csv"
    write_trace(path, times, [prompt] * n, [output] * n, ["3:5"] * n)
    return load_trace(path)


def test_static_replay_bills_gpus_and_meets_the_slo_when_ample(tmp_path):
    trace = _trace(tmp_path, [(120, 1.0)])
    model = parse(ClusterModel, SMALL)
    cfg = parse_config({"policy": "slo", "slo": {"ttft_s": 2.0, "tpot_s": 0.1}})
    out = simulate_static(trace, model, cfg, {"trunk": 2, "g0": 2, "g1": 2})
    assert out.slo_attainment == 1.0
    assert out.gpu_hours == pytest.approx(6 * trace.duration_s / 3600, rel=1e-6)
    assert np.all(np.isfinite(out.tpot_s)) and np.all(out.ttft_s > 0)
    # Starved: one trunk worker, 16 slots, arrivals far above what it serves.
    starved = simulate_static(_trace(tmp_path, [(120, 12.0)]), model, cfg, {"trunk": 1, "g0": 1, "g1": 1})
    assert starved.slo_attainment < 0.5


def test_static_replay_needs_every_unit(tmp_path):
    trace = _trace(tmp_path, [(10, 1.0)])
    with pytest.raises(ValueError, match=r"static replicas missing for \['g1'\]"):
        simulate_static(trace, parse(ClusterModel, SMALL), parse_config({}), {"trunk": 1, "g0": 1})


def test_policy_scales_up_for_a_burst_and_back_down(tmp_path):
    trace = _trace(tmp_path, [(120, 0.5), (120, 8.0), (360, 0.5)])
    model = parse(ClusterModel, SMALL)
    cfg = parse_config({
        "policy": "slo",
        "interval_s": 5,
        "window_s": 15,
        "slo": {"ttft_s": 2.0, "tpot_s": 0.1},
        "limits": {"trunk": {"min_replicas": 1, "max_replicas": 4}, "expert_groups": {"min_replicas": 1, "max_replicas": 4},
                   "downscale_delay_s": 30},
    })
    out = simulate(trace, model, cfg)
    tl = out.timeline
    burst = (tl["t"] > 120) & (tl["t"] < 240)
    assert tl["trunk"][burst].max() > 1
    assert tl["gpus"][-1] == 3  # back to the floor of every unit
    assert out.peak["trunk"] == tl["trunk"].max()
    ups = [line for _, line in out.decisions if line.startswith("trunk 1 -> ")]
    assert ups and all(": " in line for line in ups)  # every change says why
    assert any("redundant experts" in line and "e3+1" in line for _, line in out.decisions)
    # Pure replay: the same trace and config give the same decisions.
    again = simulate(trace, model, cfg)
    assert again.decisions == out.decisions and again.gpu_hours == out.gpu_hours
    static = simulate_static(trace, model, cfg, out.peak)
    assert out.gpu_hours < static.gpu_hours
