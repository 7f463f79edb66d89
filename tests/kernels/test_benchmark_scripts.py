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
