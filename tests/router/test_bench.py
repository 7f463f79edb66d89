"""`moeserve bench`: workload and statistics, then a real run against a tiny server (counts and shape)."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from edge_harness import running_server
from moeserve.cluster.cli import build_parser
from moeserve.cluster.cli.bench import report, run_bench
from moeserve.router.bench import Distribution, RequestRecord, arrival_times, make_workload, percentile, summarize


def test_distributions_parse_and_sample():
    rng = random.Random(0)
    assert Distribution.parse("32").sample(rng) == 32 == Distribution.parse("fixed:32").sample(rng)
    assert {Distribution.parse("uniform:3:5").sample(rng) for _ in range(200)} == {3, 4, 5}
    normal = [Distribution.parse("normal:100:10").sample(rng) for _ in range(2000)]
    assert 98 < statistics.mean(normal) < 102 and 9 < statistics.stdev(normal) < 11
    assert min(Distribution.parse("normal:2:50").sample(rng) for _ in range(500)) == 1  # lengths stay >= 1
    lognormal = sorted(Distribution.parse("lognormal:64:0.5").sample(rng) for _ in range(2001))
    assert 58 <= lognormal[1000] <= 70  # the median
    for bad in ("x", "uniform:5:3", "fixed:0", "normal:10", "poisson:3:4", "normal:10:-1"):
        with pytest.raises(ValueError, match="length distribution"):
            Distribution.parse(bad)


def test_workload_fits_the_server_and_is_reproducible():
    kw = dict(vocab_size=50, context_length=40, max_prompt_tokens=30, max_tokens_limit=20, seed=3)
    items, clipped = make_workload(100, Distribution.parse("uniform:1:60"), Distribution.parse("uniform:1:30"), **kw)
    assert clipped > 0
    for it in items:
        assert 1 <= len(it.prompt_token_ids) <= 30 and all(0 <= t < 50 for t in it.prompt_token_ids)
        assert 1 <= it.max_tokens <= 20 and len(it.prompt_token_ids) + it.max_tokens <= 40
    again, _ = make_workload(100, Distribution.parse("uniform:1:60"), Distribution.parse("uniform:1:30"), **kw)
    assert again == items


def test_shared_prefix_workload():
    kw = dict(vocab_size=50, context_length=40, max_prompt_tokens=30, max_tokens_limit=20, seed=3)
    items, clipped = make_workload(9, Distribution.parse("uniform:1:8"), Distribution.parse("4"), **kw,
                                   shared_prefix_len=12, num_shared_prefixes=3)
    prefixes = [items[i].prompt_token_ids[:12] for i in range(3)]
    assert len({tuple(p) for p in prefixes}) == 3 and clipped == 0
    for i, it in enumerate(items):
        assert it.prompt_token_ids[:12] == prefixes[i % 3] and 13 <= len(it.prompt_token_ids) <= 20
    long, clipped = make_workload(4, Distribution.parse("10"), Distribution.parse("4"), **kw, shared_prefix_len=25)
    assert clipped == 4 and all(len(it.prompt_token_ids) == 30 and it.prompt_token_ids[:25] == long[0].prompt_token_ids[:25]
                                for it in long)
    plain, _ = make_workload(5, Distribution.parse("uniform:1:60"), Distribution.parse("4"), **kw)
    same, _ = make_workload(5, Distribution.parse("uniform:1:60"), Distribution.parse("4"), **kw, shared_prefix_len=0)
    assert plain == same
    with pytest.raises(ValueError, match="shared prefixes"):
        make_workload(1, Distribution.parse("4"), Distribution.parse("4"), **kw, shared_prefix_len=-1)


def test_poisson_arrivals():
    times = arrival_times(4000, rate=20.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and all(g >= 0 for g in gaps)
    assert 0.045 < statistics.mean(gaps) < 0.055  # mean gap 1/rate
    assert 0.9 < statistics.stdev(gaps) / statistics.mean(gaps) < 1.1  # exponential: cv = 1
    assert arrival_times(5, rate=float("inf"), seed=1) == [0.0] * 5


def test_percentiles_and_summary():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([1, 2], 100) == 2
    recs = [RequestRecord(10, 4, start=0.0, first_token=0.1, end=0.4, output_tokens=4),
            RequestRecord(10, 4, start=0.5, first_token=0.7, end=1.0, output_tokens=4),
            RequestRecord(10, 4, start=0.6, error="RESOURCE_EXHAUSTED")]
    s = summarize(recs, duration=1.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"RESOURCE_EXHAUSTED": 1})
    assert s["output_token_throughput"] == 8 and s["request_throughput"] == 2
    assert s["ttft_ms"]["p50"] == pytest.approx(150) and s["tpot_ms"]["p50"] == pytest.approx(100)
    assert summarize([], 0.0)["ttft_ms"]["p50"] is None


@pytest.mark.asyncio
async def test_bench_against_a_live_server(tmp_path, capsys):
    async with running_server() as srv:
        out = tmp_path / "results.json"
        closed = build_parser().parse_args([
            "bench", "--address", srv.address, "--concurrency", "3", "--num-requests", "7",
            "--prompt-len", "uniform:3:9", "--output-len", "5", "--seed", "1", "--warmup", "1", "--out", str(out)])
        result = await run_bench(closed)
        assert report(result, closed) == 0
        saved = json.loads(out.read_text())
        assert set(saved) == {"config", "summary", "requests"} and len(saved["requests"]) == 7
        s = saved["summary"]
        assert (s["completed"], s["failed"], s["total_output_tokens"], s["length_mismatches"]) == (7, 0, 35, 0)
        for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert set(s[key]) == {"mean", "p50", "p90", "p99"} and s[key]["p50"] > 0
        assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0
        assert saved["config"]["concurrency"] == 3 and saved["config"]["prompt_len"] == "uniform:3:9"
        assert all(3 <= r["prompt_tokens"] <= 9 and r["output_tokens"] == 5 for r in saved["requests"])
        assert "TTFT" in capsys.readouterr().out

        open_loop = build_parser().parse_args([
            "bench", "--address", srv.address, "--rate", "200", "--num-requests", "6", "--output-len", "uniform:2:6",
            "--prompt-len", "4"])
        result = await run_bench(open_loop)
        s = result["summary"]
        assert (s["completed"], s["length_mismatches"]) == (6, 0)
        assert s["total_output_tokens"] == sum(r["max_tokens"] for r in result["requests"])
        assert result["config"]["rate"] == 200 and result["config"]["concurrency"] is None
        assert srv.engine.stats()["kv_blocks_used"] == 0

        before = srv.engine.stats()["prefix_cache_hit_tokens"]
        shared = build_parser().parse_args([
            "bench", "--address", srv.address, "--concurrency", "1", "--num-requests", "4", "--output-len", "2",
            "--prompt-len", "3", "--shared-prefix-len", "40", "--num-shared-prefixes", "2"])
        result = await run_bench(shared)
        assert result["summary"]["completed"] == 4 and all(r["prompt_tokens"] == 43 for r in result["requests"])
        assert result["config"]["shared_prefix_len"] == 40 and result["config"]["num_shared_prefixes"] == 2
        # one request at a time: the third and fourth find the first and second's prefix (2 whole blocks of 16)
        assert srv.engine.stats()["prefix_cache_hit_tokens"] - before == 2 * 32


def test_gpu_benchmark_script_runs_end_to_end_on_a_tiny_model(tmp_path):
    """benchmarks/bench_serving.py --smoke: server process, gRPC load, floor, JSON and the markdown table."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serving.py"
    run = subprocess.run([sys.executable, str(script), "--smoke", "--skip-hf", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "bench_serving.json").read_text())
    assert "server: " in (tmp_path / "server_tiny.log").read_text()  # the server's log is kept beside the results
    ours = report["models"]["tiny"]["moeserve"]
    assert set(ours) == {"1", "2", "rate50"}  # fixed concurrency 1 and 2, then Poisson arrivals
    assert all(r["failed"] == 0 and r["output_token_throughput"] > 0 for r in ours.values())
    assert report["models"]["tiny"]["floor"]["2"]["active_weight_bytes"] > 0
    # what the server set up, as it reported it: on the CPU no graphs, so no prefill hold
    facts = report["models"]["tiny"]["server"]
    assert facts["graphs"] == "decode graphs off" and facts["kv_blocks"] > 0
    assert 0 <= facts["engine_start_s"] < 300  # how long the engine took to start (graph captures on a GPU)
    assert facts["prefill_hold_ms"] == report["prefill_hold_ms"] == 0.0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "prefill hold 0 ms" in md and "- tiny server: decode graphs off; engine started in " in md
    assert "| tiny | 2 |" in md and "| tiny | 50 |" in md
    # the traces: every server step, every request of each concurrency level with its TTFT
    server = json.loads((tmp_path / "trace_tiny_server.json").read_text())
    served = sum(r["completed"] for r in ours.values())
    assert len(server["steps"]) > served and all(ms > 0 and tokens > 0 for _, ms, tokens, _ in server["steps"])
    assert server["gc_pauses_fields"] == ["start", "generation", "ms"]
    assert all(g in (0, 1, 2) and ms >= 1 for _, g, ms in server["gc_pauses"])
    client = json.loads((tmp_path / "trace_tiny_client.json").read_text())
    assert {k: len(v["requests"]) for k, v in client.items()} == {"1": ours["1"]["requests"], "2": ours["2"]["requests"]}
    assert all(r["ttft"] > 0 for v in client.values() for r in v["requests"])
    # trace_arrivals.py: each prompt step with the requests sent while it ran (every request is counted once
    # over the steps and gaps, so no step counts more than were sent)
    sys.path.insert(0, str(script.parent))
    import trace_arrivals

    steps = trace_arrivals.prompt_steps(server, client, min_tokens=1)
    assert len(steps) == len(server["steps"]) and sum(s["sent_during"] for s in steps) <= served
    arrivals = subprocess.run([sys.executable, str(script.parent / "trace_arrivals.py"), str(tmp_path),
                               "--min-tokens", "2"], capture_output=True, text=True, timeout=60)
    assert arrivals.returncode == 0 and arrivals.stdout.startswith("tiny: "), arrivals.stderr
    assert "requests sent during it" in arrivals.stdout


def test_gpu_benchmark_levels_draw_prompts_of_their_own():
    """bench_serving.py: no concurrency level re-sends the prompts of another (the prefix cache would still
    hold them, and the level's first wave would read them as short chunks after a cached prefix) or of its
    own warm-up; the same arguments draw the same prompts."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serving.py"
    spec = importlib.util.spec_from_file_location("bench_serving_levels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(seed=0, prompt_len=48, output_len=8)
    limits = dict(vocab_size=512, context_length=128, max_prompt_tokens=127, max_tokens_limit=127)
    seen = set()
    for c in (1, 16, 64):
        items, warm = module.level_workloads(c, 2 * c, args, limits)
        assert len(items) == 2 * c and len(warm) == c and all(len(w.prompt_token_ids) == 48 for w in items + warm)
        prompts = {tuple(w.prompt_token_ids) for w in items + warm}
        assert len(prompts) == 3 * c and not prompts & seen
        seen |= prompts
        again, _ = module.level_workloads(c, 2 * c, args, limits)
        assert [w.prompt_token_ids for w in again] == [w.prompt_token_ids for w in items]


def test_engine_profile_script_runs_on_a_tiny_model(tmp_path):
    """benchmarks/profile_engine.py --smoke: prefill and decode step times (padded decode on CPU) and kernel tables."""
    report = _script("profile_engine", tmp_path, "--smoke")["tiny"]
    for b in ("1", "2"):
        assert report[b]["decode_graph_ms"] > 0 and report[b]["decode_eager_ms"] > 0 and report[b]["prefill_steps_ms"]
    assert report["engine"]["waiting"] == report["engine"]["running"] == 0
    assert "one prefill step" in (tmp_path / "profile_engine.txt").read_text()


def test_profile_variants_script_times_each_variant_in_its_own_process(tmp_path):
    """benchmarks/profile_variants.py --smoke: each variant's settings applied in its own profile_engine run,
    every round; a setting naming nothing refuses to run rather than time the code as it is."""
    import subprocess
    import sys
    from pathlib import Path

    result = _script("profile_variants", tmp_path, "--smoke", "--rounds", "1", "--variant", "base=",
                     "--variant", "wide=ops.LINEAR_MMA_MAX_K=4096;decode_attention.FUSED_MERGE=True")
    assert result["variants"] == {"base": [], "wide": [["ops", "LINEAR_MMA_MAX_K", 4096],
                                                      ["decode_attention", "FUSED_MERGE", True]]}
    for name in ("base", "wide"):
        (run,) = result["results"][name]
        assert set(run["tiny"]) == {"1", "2"} and all(v["decode_graph_ms"] > 0 for v in run["tiny"].values())
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_variants.py"
    bad = subprocess.run([sys.executable, str(script), "--smoke", "--rounds", "1", "--variant", "x=ops.NO_SUCH=1",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "moeserve.kernels.ops has no NO_SUCH" in bad.stderr


def test_routing_spread_script_runs_on_a_tiny_model(tmp_path):
    """benchmarks/routing_spread.py --smoke: distinct experts per layer for prefill and decode steps,
    each within [top_k, experts] and beside its uniform expectation."""
    results = _script("routing_spread", tmp_path, "--smoke")
    assert [r["batch"] for r in results] == [1, 3]
    for r in results:
        for kind in ("prefill", "decode"):
            x = r[kind]
            assert r["top_k"] <= x["min_distinct"] <= x["mean_distinct"] <= r["experts"]
            assert r["top_k"] <= x["uniform_expectation"] <= r["experts"]


def _script(name: str, tmp_path, *args: str) -> dict:
    """Run benchmarks/<name>.py with `args` and --out-dir tmp_path; its JSON result."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    run = subprocess.run([sys.executable, str(script), *args, "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_prefix_cache_script_runs_on_the_demo_model(tmp_path):
    """benchmarks/bench_prefix_cache.py at small numbers: three runs over gRPC; only caching on hits."""
    result = _script("bench_prefix_cache", tmp_path, "--requests", "6", "--prefix-len", "48", "--own-len", "4",
                     "--new-tokens", "2", "--concurrency", "2")
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"on", "off", "floor"} and all(r["summary"]["completed"] == 6 for r in runs.values())
    assert runs["on"]["hit_rate"] > 0 and runs["off"]["hit_rate"] == runs["floor"]["hit_rate"] == 0
    assert runs["on"]["computed_tokens"] < runs["off"]["computed_tokens"]


def test_dispatch_script_runs_and_checks_exactness(tmp_path):
    """benchmarks/bench_dispatch.py at small numbers (it exits non-zero if the dispatcher's output is not fused's)."""
    rows = _script("bench_dispatch", tmp_path, "--groups", "1,2", "--tokens", "1,5", "--iters", "3")["rows"]
    assert [(r["groups"], r["tokens"]) for r in rows] == [(1, 1), (1, 5), (2, 1), (2, 5)]
    assert all(r["dispatch_us"] >= r["groups_us"] > 0 for r in rows)


def test_sampling_extras_script_runs_every_kind(tmp_path):
    """benchmarks/bench_sampling_extras.py at small numbers, on the tiny random preset (its synthetic tokenizer for
    the structured kinds): each kind's step timed with every row running."""
    result = _script("bench_sampling_extras", tmp_path, "--model", "tiny", "--batch", "3", "--steps", "4",
                     "--prompt-len", "8")
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == {"plain", "logprobs", "logit_bias", "penalties", "regex", "json", "mixed"}
    assert all(r["step_ms"] > 0 and r["rows_min"] == 3 for r in rows.values())
    assert result["floor"]["step_ms"] > 0


def test_http_front_script_runs_every_way(tmp_path):
    """benchmarks/bench_http_front.py at small numbers: the same streamed requests through the engine, gRPC and HTTP."""
    results = _script("bench_http_front", tmp_path, "--requests", "3", "--concurrency", "2", "--prompt-len", "5",
                      "--new-tokens", "3")["results"]
    assert set(results) == {"engine", "grpc", "http"}
    assert all(r["requests"] == 3 and r["output_tok_s"] > 0 and r["ttft_ms"]["p50"] > 0 for r in results.values())
