"""Running a benchmark task: the script of a clone's ``experiments/`` in a subprocess, its JSON results as
metrics (goals met, wall time) and one table of rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from .config import PROJECT_ROOT
from .replays import is_scalar


def experiments_dir() -> Path:
    """The benchmark scripts' folder: ``$KVTRITON_EXPERIMENTS``, else the clone's ``experiments/``, else
    ``./experiments`` (an installed package has none of its own)."""
    env = os.environ.get("KVTRITON_EXPERIMENTS")
    if env:
        return Path(env)
    return (PROJECT_ROOT if PROJECT_ROOT is not None else Path.cwd()) / "experiments"


def bench_script(task: str) -> Path:
    return experiments_dir() / {"bench_kernels": "bench_kernels.py", "bench_memory": "bench_memory.py",
                                "bench_suite": "bench_suite.py"}[task]


def script_has_flag(path: Path, flag: str) -> bool:
    return path.is_file() and f'"{flag}"' in path.read_text()


def _bench_rows(results) -> list[dict]:
    if isinstance(results, list):
        return [r for r in results if isinstance(r, dict)]
    if isinstance(results, dict):  # {section: {...}} -> one row per section, nested keys flattened
        rows = []
        for name, sec in results.items():
            row = {"section": name}
            if isinstance(sec, dict):
                stack = [("", sec)]
                while stack:
                    prefix, d = stack.pop()
                    for k, v in d.items():
                        if isinstance(v, dict):
                            stack.append((f"{prefix}{k}.", v))
                        else:
                            row[f"{prefix}{k}"] = v
            else:
                row["value"] = sec
            rows.append(row)
        return rows
    return []


def run_bench(cfg: DictConfig, task: str, run_dir: Path, device: str) -> tuple[dict, dict]:
    """Run the benchmark script of ``task`` writing its JSON into ``run_dir``; return (metrics, tables)."""
    path = bench_script(task)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark script {path} not found")
    out_json = Path(run_dir) / (path.stem + ".json")
    cmd = [sys.executable, str(path), "--device", device, "--out", str(out_json)]
    if cfg.bench.smoke:
        cmd.append("--smoke")
    cmd += [str(a) for a in cfg.bench.args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=cfg.bench.timeout_s)
    wall = time.perf_counter() - t0
    data = json.loads(out_json.read_text())
    rows = _bench_rows(data.get("results") if isinstance(data, dict) else data)
    metrics: dict = {"bench_wall_s": wall, "bench_rows": len(rows), "bench_json": out_json.name}
    if isinstance(data, dict):
        for k, v in data.items():
            if k != "results" and is_scalar(v) and v is not None:
                metrics[k] = v
        goals = data.get("goals")
        if isinstance(goals, dict) and goals:
            metrics.update({f"goal.{k}": bool(v) for k, v in goals.items()})
            metrics["targets_met"] = sum(bool(v) for v in goals.values())
            metrics["targets_total"] = len(goals)
    met = [r for r in rows if r.get("meets_target") is not None]
    if met:
        metrics["targets_met"] = sum(bool(r["meets_target"]) for r in met)
        metrics["targets_total"] = len(met)
    return metrics, {"results": rows}
