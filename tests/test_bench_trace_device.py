"""The trace serving benchmark runs end to end on CPU and writes one result per policy; a missing trace
is a clear error before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_trace_device.py"


def _run(args, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bench_trace_device_cpu_small(traces_dir, tmp_path):
    out = tmp_path / "trace.json"
    proc = _run(["--device", "cpu", "--small", "--traces", str(traces_dir), "--requests", "30",
                 "--policies", "lru", "arc", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"] == 30 and report["distinct_prompt_blocks"] > 0
    assert report["capacity_blocks"] >= 1
    assert set(report["results"]) == {"lru", "arc"}
    for row in report["results"].values():
        assert 0.0 <= row["hit_rate"] <= 1.0
        assert row["decode_tokens"] > 0 and row["decode_tokens_per_s"] > 0
        fracs = row["step_kernel_frac"] + row["step_memory_frac"] + row["step_other_frac"]
        assert abs(fracs - 1.0) < 1e-6
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_bench_trace_device_missing_trace(tmp_path):
    proc = _run(["--device", "cpu", "--small", "--traces", str(tmp_path / "nowhere")], tmp_path)
    assert proc.returncode == 2
    assert "trace not found" in proc.stderr and "KVTRITON_TRACES" in proc.stderr


def test_bench_trace_device_agentic_head(tmp_path):
    """The agentic head (sessions, stop reasons) replays under lru and session_aware, the latter in session
    mode, with the arrival process and the compression stated."""
    from kvtriton.workloads.paths import agentic_trace_path

    archive = agentic_trace_path()
    if not archive.exists():
        pytest.skip(f"the agentic traces are not at {archive} (set $KVTRITON_AGENTIC_TRACES)")
    out = tmp_path / "agentic.json"
    proc = _run(["--workload", "agentic", "--agentic-path", str(archive), "--conversations", "3",
                 "--device", "cpu", "--small", "--requests", "12", "--max-input", "512", "--time-compression",
                 "4", "--step-time-s", "0.02", "--pick-capacity", "--policies", "lru", "session_aware",
                 "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "session_aware runs in 'session' mode" in proc.stdout
    assert "Poisson process at 0.1/s" in proc.stdout and "compressed 4x" in proc.stdout
    report = json.loads(out.read_text())
    assert report["workload"] == "agentic" and report["requests"] == 12
    assert report["session_aware_mode"] == "session" and report["sessions"] >= 1
    assert report["max_input_tokens"] == 512 and report["time_compression"] == 4.0
    assert report["capacity_pick"] and report["capacity_blocks"] >= 1
    for row in report["results"].values():
        assert 0.0 <= row["hit_rate"] <= 1.0 and row["completed"] == 12
        assert row["ttft_s_p50"] <= row["ttft_s_p90"] <= row["ttft_s_p99"]
        assert row["throughput_req_per_s"] > 0
        assert row["prefill_tokens_saved"] + row["prefill_tokens_computed"] >= row["prefill_tokens"]
