"""The trace serving benchmark runs end to end on CPU and writes one result per policy; a missing trace
is a clear error before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
