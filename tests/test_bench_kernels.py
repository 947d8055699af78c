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
    assert kernels == {"paged_decode_attention", "paged_prefill_attention", "PagedAttentionPlan.run", "append_kv",
                       "gather_blocks", "gather_kv", "move_blocks", "compact_tokens"}
    prefill = [r for r in report["results"] if r["kernel"] == "paged_prefill_attention"]
    assert {r["extra"]["prefix"] > 0 for r in prefill} == {True, False}
    for r in prefill:
        assert r["extra"]["tflops"] > 0 and r["extra"]["baseline_rel_diff"] < 1e-2
    (prefix,) = [r for r in prefill if r["extra"]["prefix"]]
    assert prefix["extra"]["same_flops_prefill_ms"] > 0
    (mixed,) = [r for r in report["results"] if r["kernel"] == "PagedAttentionPlan.run"]
    assert mixed["extra"]["equals_functional_parts"] is True and mixed["extra"]["baseline_rel_diff"] < 1e-2
    assert "decode" in mixed["extra"]["launches"] and "prefill" in mixed["extra"]["launches"]
    for r in report["results"]:
        assert set(r) == set(RESULT_KEYS), set(r) ^ set(RESULT_KEYS)
        for key, typ in RESULT_KEYS.items():
            assert isinstance(r[key], typ), (r["kernel"], key, r[key])
        assert r["bytes"] > 0 and r["ms"] > 0 and r["baseline_ms"] > 0
        assert abs(r["gbps"] - r["bytes"] / r["ms"] / 1e6) < 1e-6 * r["gbps"]
        assert abs(r["frac_copy"] - r["gbps"] / report["copy_gbps"]) < 1e-9 * max(1.0, r["frac_copy"])
        assert abs(r["speedup"] - r["baseline_ms"] / r["ms"]) < 1e-9 * max(1.0, r["speedup"])
        assert r["extra"]["correct"] is True


def test_profile_ops_cpu_twin_smoke(tmp_path):
    """The CPU twin of profile_ops.py (also reachable as profile_ops.py --device cpu) runs and writes its
    rows: every candidate beside a baseline that computes the same thing."""
    out = tmp_path / "profile.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))   # the PyTorch path is what it times
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "profile_ops.py"), "--device", "cpu",
                           "--smoke", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ops = {r["op"] for r in report["rows"]}
    assert ops == {"paged_decode_attention", "PagedAttentionPlan.run (decode)", "append_kv", "paged_prefill_attention",
                   "PagedAttentionPlan.run (prefill)", "PagedAttentionPlan.run (mixed)"}
    for r in report["rows"]:
        assert r["us"] > 0 and r["baseline_us"] > 0 and abs(r["ratio"] - r["us"] / r["baseline_us"]) < 1e-9
        assert r["target_ratio"] == (2.0 if r["kind"] == "plan" else 3.0)
        assert abs(r["baseline_rel_diff"]) < 1e-4, r
