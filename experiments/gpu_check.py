"""Check and time everything on a CUDA machine in one call, within 10 minutes.

Runs, in order (step limits add up to about 8 minutes): the GPU correctness tests (``pytest -m gpu`` with
the interpreter off), the kernel benchmark, a launch-cost and split-KV profile, the device replay at the performance goal's shape, a device
replay of the head of a Mooncake trace under several policies, the memory-manager benchmark and the
design-document benchmark suite. Each step has its own time limit; a failed or timed-out step is reported and the rest still run.
Every step's JSON lands in ``--out`` (default ``gpu_results/``); the summary table is printed last and
written to ``gpu_check.json``.

    python experiments/gpu_check.py --out $OUT

On a machine without hydra/wandb this needs nothing beyond torch, triton, numpy, pytest and
opentelemetry-api (``experiments/gpu_check.sh`` installs carried wheels first).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _steps(out: Path, quick: bool):
    py = sys.executable
    q = ["--quick"] if quick else []
    return [
        ("gpu tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                       "tests/test_gpu.py", "tests/test_ops_prefill.py", "tests/test_ops_plan.py",
                       "tests/test_ops_scores.py"], None, 150),
        ("kernel benchmark", [py, "experiments/bench_kernels.py", "--out", str(out / "bench_kernels.json"), *q],
         out / "bench_kernels.json", 180),
        ("launch profile", [py, "experiments/profile_ops.py", "--out", str(out / "profile_ops.json")],
         out / "profile_ops.json", 60),
        ("device replay", [py, "experiments/bench_replay_device.py", "--device", "cuda",
                           "--out", str(out / "bench_replay_device.json")], out / "bench_replay_device.json", 60),
        ("trace replay", [py, "experiments/bench_trace_device.py", "--device", "cuda",
                          "--out", str(out / "bench_trace_device.json")], out / "bench_trace_device.json", 75),
        ("memory benchmark", [py, "experiments/bench_memory.py", "--device", "cuda",
                              "--out", str(out / "bench_memory.json")], out / "bench_memory.json", 40),
        ("design suite", [py, "experiments/bench_suite.py", "--device", "cuda",
                          "--out", str(out / "bench_suite.json")], out / "bench_suite.json", 60),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_results", help="folder for the JSON results and logs")
    ap.add_argument("--quick", action="store_true", help="fewer kernel-benchmark cases")
    ap.add_argument("--only", nargs="*", default=None, help="run only steps whose name contains one of these")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    try:
        import torch
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        versions = {"torch": torch.__version__}
        import triton
        versions["triton"] = triton.__version__
    except Exception as e:  # still report what ran
        device, versions = f"unknown ({e})", {}
    print(f"gpu_check on {device} {versions} at {_dt.datetime.now(_dt.timezone.utc).isoformat()}", flush=True)
    summary = []
    for name, cmd, json_path, limit in _steps(out, args.quick):
        if args.only and not any(s in name for s in args.only):
            continue
        print(f"\n=== {name}: {' '.join(cmd[1:])} (limit {limit}s)", flush=True)
        t0 = time.perf_counter()
        log = out / (name.replace(" ", "_") + ".log")
        try:
            with open(log, "w") as fh:
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
                # A watchdog, so that a step that hangs without printing is stopped too.
                watchdog = threading.Timer(limit, p.kill)
                watchdog.start()
                try:
                    for line in p.stdout:
                        sys.stdout.write(line)
                        fh.write(line)
                    rc = p.wait()
                finally:
                    watchdog.cancel()
            status = "ok" if rc == 0 else ("timed out" if time.perf_counter() - t0 >= limit else f"failed (rc={rc})")
        except Exception as e:
            status = f"error: {e}"
        secs = time.perf_counter() - t0
        summary.append({"step": name, "status": status, "seconds": round(secs, 1),
                        "json": str(json_path) if json_path and json_path.exists() else None})
    report = {"device": device, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(), **versions,
              "steps": summary}
    # Fold the headline numbers of each benchmark into the summary.
    kern = out / "bench_kernels.json"
    if kern.exists():
        data = json.loads(kern.read_text())
        report["copy_gbps"] = data.get("copy_gbps")
        report["kernels"] = [
            {k: r.get(k) for k in ("kernel", "case", "gbps", "frac_copy", "speedup", "meets_target")}
            for r in data.get("results", [])]
    rep = out / "bench_replay_device.json"
    if rep.exists():
        data = json.loads(rep.read_text())
        report["device_replay"] = {"goal_shape": data.get("goal_shape"), "goal_met": data.get("goal_met"),
                                    "batch": data.get("batch"), "context": data.get("context"),
                                    "num_layers": data.get("num_layers"), **data.get("split", {})}
    trace = out / "bench_trace_device.json"
    if trace.exists():
        data = json.loads(trace.read_text())
        report["trace_replay"] = {k: data.get(k) for k in ("trace", "requests", "num_layers", "capacity_blocks")}
        report["trace_replay"]["results"] = data.get("results", {})
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print("\n" + "=" * 72)
    print(f"SUMMARY  device: {device}  {versions}")
    for s in summary:
        print(f"  {s['step']:<18} {s['status']:<16} {s['seconds']:>7.1f} s")
    if report.get("kernels"):
        print(f"  copy bandwidth: {report['copy_gbps']:.0f} GB/s")
        print(f"  {'kernel':<24}{'case':<28}{'GB/s':>9}{'of copy':>9}{'speedup':>9}  target")
        for r in report["kernels"]:
            met = {True: "met", False: "MISSED", None: ""}[r.get("meets_target")]
            print(f"  {str(r['kernel']):<24}{str(r['case']):<28}{r['gbps'] or 0:>9.0f}"
                  f"{(r['frac_copy'] or 0):>9.2f}{(r['speedup'] or 0):>9.2f}  {met}")
    if report.get("device_replay"):
        d = report["device_replay"]
        verdict = ("met" if d.get("goal_met") else "NOT met") if d.get("goal_shape") else "not the goal's shape"
        print(f"  device replay (batch {d.get('batch')}, {d.get('context')} tokens, {d.get('num_layers')} layers): "
              f"step {d.get('step_ms_median', 0):.2f} ms, memory management {d.get('memory_frac', 0):.2%} of step "
              f"time, goal <= 5%: {verdict}")
    if report.get("trace_replay"):
        t = report["trace_replay"]
        print(f"  trace replay ({t['trace']}, first {t['requests']} requests, {t['num_layers']} layers, "
              f"{t['capacity_blocks']} blocks):")
        for pol, r in t["results"].items():
            print(f"    {pol:<14} hit {r['hit_rate']:.4f}  TTFT p50 {r['ttft_s_p50'] * 1e3:8.1f} ms  decode "
                  f"{r['decode_tokens_per_s']:9.0f} tok/s  memory {r['step_memory_frac']:.1%}")
    return 0 if all(s["status"] == "ok" for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
