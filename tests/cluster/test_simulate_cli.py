"""`moeserve autoscale simulate` on the shipped traces and policies, and `autoscale check`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from moeserve.cluster.cli import main

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT / "cluster" / "traces"
CONFIGS = ROOT / "cluster" / "configs"


def _table(out: str) -> dict[str, tuple[float, float]]:
    """{replay label: (GPU-hours, % in SLO)} from the printed comparison table."""
    rows = {}
    for m in re.finditer(r"^(\S.*?)\s{2,}(\d+\.\d)\s+(\d+\.\d\d)%", out, re.MULTILINE):
        rows[m.group(1).strip()] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_bursty_trace_slo_policy_beats_static_at_peak(tmp_path, capsys):
    png = tmp_path / "bursty.png"
    rc = main(["autoscale", "simulate", "--trace", str(TRACES / "bursty.csv.gz"),
               "--policy", str(CONFIGS / "slo.yaml"), "--plot", str(png), "--decisions", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _table(out)
    policy_h, policy_slo = rows["slo policy"]
    static_h, static_slo = rows["static at peak"]
    assert policy_slo >= 99.0
    assert policy_h < static_h
    # Decisions over time, each with its reason: scale-ups for bursts and scale-downs after.
    assert re.search(r"^\s+\d:\d\d:\d\d  trunk 3 -> 4: .+", out, re.MULTILINE)
    assert re.search(r"^\s+\d:\d\d:\d\d  g\d 3 -> 2: latency calm", out, re.MULTILINE)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diurnal_trace_writes_the_plot_by_trace_and_policy_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["autoscale", "simulate", "--trace", str(TRACES / "diurnal.csv.gz"),
               "--policy", str(CONFIGS / "slo-steady.yaml"), "--decisions", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _table(out)
    assert set(rows) == {"slo policy", "static at peak"}
    assert rows["slo policy"][0] < rows["static at peak"][0]
    assert "more (use --decisions 0 for all)" in out
    assert [p.name for p in tmp_path.iterdir()] == ["diurnal-slo-steady.png"]


def test_missing_matplotlib_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the plot extra looks like
    rc = main(["autoscale", "simulate", "--trace", str(TRACES / "bursty.csv.gz"), "--policy", str(CONFIGS / "slo.yaml")])
    assert rc == 2
    assert "needs matplotlib" in capsys.readouterr().out


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("policy: slo\nlimits: {trunk: {max_replicas: 0}}\n")
    assert main(["autoscale", "check", "--policy", str(bad)]) == 2
    assert "limits.trunk.max_replicas: 0 is out of range; allowed: >= 1 and <= 4096" in capsys.readouterr().out
    assert main(["autoscale", "simulate", "--trace", str(tmp_path / "none.csv"), "--policy", str(CONFIGS / "slo.yaml"),
                 "--no-plot"]) == 2
    assert "no such trace file" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["autoscale", "simulate", "--trace", "x", "--policy", "y", "--decisions", "-1"])
    assert "--decisions: must be >= 0" in capsys.readouterr().err


def test_check_prints_the_filled_in_policy(capsys):
    assert main(["autoscale", "check", "--policy", str(CONFIGS / "target-utilisation.yaml")]) == 0
    out = capsys.readouterr().out
    assert "policy: target_utilisation" in out and "expert_busy: 0.5" in out and "cooldown_s: 0.0" in out
