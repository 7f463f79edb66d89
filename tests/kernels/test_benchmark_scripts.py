"""The benchmark scripts that also run on a machine without a GPU: their CPU paths, so that a GPU
session does not find them broken."""


def test_gemv_register_report_runs_on_a_table(tmp_path):
    """benchmarks/gemv_registers.py compiles a table's one-token GEMVs for sm_90 and reads their
    registers from the cubins: here a made-up table with a bf16 entry (per-slot rows, then the
    combine) and an FP8 one with prequantised activations; entries without GEMVs are skipped."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from moeserve.kernels.configs import GemvConfig, MoeConfig

    table = tmp_path / "table.json"
    table.write_text(json.dumps({
        "E=8,H=256,I=128,k=2,bf16": {"1": MoeConfig(gemv=GemvConfig(up_rows=2, down_rows=4, combine=True)).to_dict(),
                                     "8": MoeConfig().to_dict()},
        "E=8,H=256,I=128,k=2,fp8": {"1": MoeConfig(gemv=GemvConfig(combine=False, up_prequant=True)).to_dict()},
        "E=8,H=256,I=128,k=2,int8": {"1": MoeConfig(per_slot=True).to_dict()},
    }))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gemv_registers.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    run = subprocess.run([sys.executable, str(script), "--table", str(table), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["kernel"].split(" ", 1)[1] for r in rows] == [
        "gate/up rows=2", "down rows=4 combine", "gate/up rows=4", "down rows=8"]
    assert all(0 < r["registers"] <= 255 and 0 < r["resident_warps"] <= 64 for r in rows)


def test_gemv_stream_variants_match_torch():
    """benchmarks/gemv_stream.py's stripped-down gate/up kernels (raw streaming, widening, the dot
    without quantisation; bf16 and FP8; plain and evict-first loads) compute what they claim, so
    the speed of light it reports is that of real work."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gemv_stream.py"
    spec = importlib.util.spec_from_file_location("gemv_stream", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.smoke() == 0


def test_pick_configs_keeps_the_faster_run_per_case(tmp_path):
    """benchmarks/pick_configs.py: of two bench_kernels runs on one GPU, each (shape, format, token
    count) takes the configuration of the faster call, under its own bucket; buckets no run measured
    stay; runs from different GPUs are refused."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from moeserve.kernels.configs import GemvConfig, MoeConfig, shape_key
    from moeserve.kernels.roofline import SHAPES

    old, gemv = MoeConfig(per_slot=True).to_dict(), MoeConfig(gemv=GemvConfig(up_rows=2)).to_dict()
    big = MoeConfig(block_m=128).to_dict()

    def run(gpu, times):  # times: {(shape, tokens): (bf16 ms, fp8 ms)}; run 0 used `old`, run 1 `gemv`/`big`
        cfg = old if gpu.endswith("own") else None
        return {"gpu": gpu.split(":")[0], "rows": [
            {"shape": s, "tokens": t, **{q: {"ms": ms, "config": cfg or (gemv if t == 1 else big)}
                                        for q, ms in zip(("bf16", "fp8"), pair)}}
            for (s, t), pair in times.items()]}

    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(run("GPU X:own", {("qwen3-30b-a3b", 1): (0.030, 0.020), ("qwen3-30b-a3b", 64): (0.40, 0.20)})))
    b.write_text(json.dumps(run("GPU X:borrowed", {("qwen3-30b-a3b", 1): (0.022, 0.021), ("qwen3-30b-a3b", 64): (0.41, 0.19)})))
    q = SHAPES["qwen3-30b-a3b"]
    keep = MoeConfig(block_m=64).to_dict()
    table = tmp_path / "table.json"
    table.write_text(json.dumps({shape_key(q.experts, q.hidden, q.inter, q.top_k, "bf16"): {"4096": keep}}))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "pick_configs.py"
    done = subprocess.run([sys.executable, str(script), str(a), str(b), "--table", str(table)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "qwen3-30b-a3b bf16 1 tokens: run 1 (run 0: 30.0 us, run 1: 22.0 us)" in done.stdout
    out = json.loads(table.read_text())
    key = shape_key(q.experts, q.hidden, q.inter, q.top_k, "{}")
    def written(config):  # as the table holds it: no "gemv": null
        return {k: v for k, v in config.items() if v is not None}

    assert out[key.format("bf16")] == {"1": written(gemv), "64": written(old), "4096": keep}
    assert out[key.format("fp8")] == {"1": written(old), "64": written(big)}
    assert MoeConfig.from_dict(out[key.format("bf16")]["1"]) == MoeConfig(gemv=GemvConfig(up_rows=2))
    b.write_text(json.dumps(run("GPU Y:borrowed", {("qwen3-30b-a3b", 1): (0.022, 0.021)})))
    refused = subprocess.run([sys.executable, str(script), str(a), str(b), "--table", str(table)],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert refused.returncode != 0 and "different GPUs" in refused.stderr
