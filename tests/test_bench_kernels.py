"""The kernel benchmark runs end to end on CPU (``--device cpu --smoke``) and writes the documented JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RESULT_KEYS = {"kernel": str, "case": str, "bytes": int, "ms": float, "gbps": float, "frac_copy": float,
               "baseline": str, "baseline_ms": float, "speedup": float, "target_frac": (float, type(None)),
               "target_speedup": (float, type(None)), "meets_target": (bool, type(None)), "extra": dict}


def test_bench_kernels_cpu_smoke_json(tmp_path):
    out = tmp_path / "bench.json"
    # The references (interpreter off) keep this fast; the kernels themselves are tested elsewhere.
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_kernels.py"), "--device", "cpu",
                           "--smoke", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Summary" in proc.stdout
    report = json.loads(out.read_text())
    for key, typ in (("device", str), ("date", str), ("torch", str), ("triton", (str, type(None))),
                     ("copy_gbps", float), ("results", list)):
        assert isinstance(report[key], typ), key
    assert report["copy_gbps"] > 0
    assert all(c["ok"] for c in report["checks"])
    kernels = {r["kernel"] for r in report["results"]}
    assert kernels == {"paged_decode_attention", "append_kv", "gather_blocks", "gather_kv", "move_blocks",
                       "compact_tokens"}
    for r in report["results"]:
        assert set(r) == set(RESULT_KEYS), set(r) ^ set(RESULT_KEYS)
        for key, typ in RESULT_KEYS.items():
            assert isinstance(r[key], typ), (r["kernel"], key, r[key])
        assert r["bytes"] > 0 and r["ms"] > 0 and r["baseline_ms"] > 0
        assert abs(r["gbps"] - r["bytes"] / r["ms"] / 1e6) < 1e-6 * r["gbps"]
        assert abs(r["frac_copy"] - r["gbps"] / report["copy_gbps"]) < 1e-9 * max(1.0, r["frac_copy"])
        assert abs(r["speedup"] - r["baseline_ms"] / r["ms"]) < 1e-9 * max(1.0, r["speedup"])
        assert r["extra"]["correct"] is True
