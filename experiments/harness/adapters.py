"""The one place where the harness calls the library: names, workloads, policies, replays, benchmarks.

Each function maps config nodes to the library's entry points (``kvtriton.workloads.make_workload``,
``kvtriton.policies``, ``kvtriton.replay.simulate`` / ``replay_device``, ``experiments/bench_*.py``) and
their results back to flat metric dicts and time-series rows.
"""

from __future__ import annotations

import inspect
import logging
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from .config import PROJECT_ROOT

log = logging.getLogger("kvtriton.harness")

EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"
_TRACE_FILES = {"mooncake_conversation": "conversation_trace.jsonl",
                "mooncake_synthetic": "synthetic_trace.jsonl"}


def plain(node) -> Any:
    """A config node as plain Python (lists become tuples where the library expects ranges)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return tuple(plain(v) for v in node)
    return node


def _call(fn: Callable, *args, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts (all of them if it takes ``**kw``)."""
    sig = inspect.signature(fn)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------ names

def model_presets() -> dict:
    from kvtriton.spec import PRESETS

    return PRESETS


def _policies_module():
    import kvtriton.policies as pol

    if hasattr(pol, "available_policies"):
        return pol
    from kvtriton.policies import base

    return base


def policy_names() -> list[str] | None:
    """Registered policy names and aliases (None while no policy is registered)."""
    names = _policies_module().available_policies(include_aliases=True)
    return names or None


def canonical_policy(name: str) -> str | None:
    try:
        return _policies_module().canonical_name(name)
    except ValueError:
        return None


def offline_policies() -> tuple[str, ...]:
    """Policies that need the trace's future (the fast replay only)."""
    try:
        from kvtriton.replay import device as dev

        return tuple(getattr(dev, "_OFFLINE_POLICIES", ("belady",)))
    except ImportError:
        return ("belady",)


def workload_names() -> list[str]:
    from kvtriton import workloads

    return workloads.available_workloads()


# --------------------------------------------------------------------------------------- workload

def trace_file(wcfg) -> Path | None:
    """The trace file a Mooncake workload reads (None for synthetic workloads)."""
    name = str(wcfg.name).lower().replace("-", "_")
    if name not in _TRACE_FILES:
        return None
    if wcfg.trace_path:
        return Path(str(wcfg.trace_path))
    folder = wcfg.traces_dir or os.environ.get("KVTRITON_TRACES") or str(PROJECT_ROOT.parent / "shared/traces/mooncake")
    return Path(str(folder)) / _TRACE_FILES[name]


def build_workload(cfg: DictConfig) -> list:
    """The request list of ``cfg.workload``, cut to ``cfg.replay.max_requests``."""
    from kvtriton.workloads import make_workload

    name = str(cfg.workload.name).lower().replace("-", "_")
    params = plain(cfg.workload.params) or {}
    limit = cfg.replay.max_requests
    if name in _TRACE_FILES:
        params = dict(params, path=str(trace_file(cfg.workload)))
        if limit is not None:
            params["limit"] = int(limit)
    else:
        params.setdefault("seed", int(cfg.workload.seed))
        if limit is not None and "num_requests" in params:  # generate no more than is replayed
            params["num_requests"] = min(int(params["num_requests"]), int(limit))
    reqs = make_workload(name, **params)
    return reqs[:limit] if limit is not None else reqs


# ----------------------------------------------------------------------------------------- device

def resolve_device(spec: str, job_num: int | None = None) -> str:
    """``auto``: ``cuda:<job_num mod #GPUs>`` when CUDA is there (one job per GPU under a multi-process
    launcher), else ``cpu``; ``cuda`` alone means ``cuda:0``. Explicit CUDA devices must exist."""
    import torch

    spec = str(spec)
    if spec == "cpu":
        return "cpu"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return f"cuda:{(job_num or 0) % n}" if n else "cpu"
    idx = 0 if spec == "cuda" else int(spec.split(":")[1])
    if idx >= n:
        raise ValueError(f"replay.device={spec!r} but {n} CUDA device(s) are visible; valid values: "
                         f"auto, cpu" + "".join(f", cuda:{i}" for i in range(n)))
    return f"cuda:{idx}"


# ----------------------------------------------------------------------------------------- replays

_SERIES_KEYS = ("series", "time_series", "timeseries", "steps")


def _split(out) -> tuple[dict, list[dict]]:
    """A replay's result as (scalar metrics, time-series rows)."""
    series: list[dict] = []
    if isinstance(out, tuple) and len(out) == 2:
        out, series = out
    if hasattr(out, "to_dict") and not isinstance(out, dict):  # a result dataclass with to_dict()
        out = out.to_dict()
    elif hasattr(out, "__dataclass_fields__"):
        import dataclasses

        out = dataclasses.asdict(out)
    metrics = {}
    for k, v in dict(out).items():
        if k in _SERIES_KEYS and v is not None:
            series = v
        elif isinstance(v, dict):
            for k2, v2 in v.items():
                if _is_scalar(v2):
                    metrics[f"{k}.{k2}"] = _scalar(v2)
        elif _is_scalar(v):
            metrics[k] = _scalar(v)
    return metrics, _rows(series)


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0)


def _scalar(v):
    return v.item() if hasattr(v, "item") else v


def _rows(series) -> list[dict]:
    if series is None:
        return []
    if hasattr(series, "to_dict") and hasattr(series, "columns"):  # a DataFrame
        return [{k: _scalar(v) for k, v in r.items()} for r in series.to_dict("records")]
    if isinstance(series, dict):  # columns -> lists
        keys = list(series)
        n = len(series[keys[0]]) if keys else 0
        return [{k: _scalar(series[k][i]) for k in keys} for i in range(n)]
    return [{k: _scalar(v) for k, v in dict(r).items()} for r in series]


def run_fast(cfg: DictConfig, requests: list, progress: bool) -> tuple[dict, list[dict]]:
    """The fast (tensor-free) prefix-cache simulation of ``cfg.policy`` at ``cfg.pool.capacity_blocks``.

    The series has a point every ``replay.series_every`` requests; ``replay.params`` go to ``simulate``
    (e.g. ``order``)."""
    from kvtriton.replay import fast

    every = cfg.replay.series_every or max(1, len(requests) // 200)
    out = _call(fast.simulate, requests, str(cfg.policy.name), int(cfg.pool.capacity_blocks),
                sample_every=int(every), policy_kwargs=plain(cfg.policy.params) or None,
                progress=progress, **(plain(cfg.replay.params) or {}))
    metrics, series = _split(out)
    if metrics.get("seconds"):
        metrics["sim_block_refs_per_s"] = metrics.get("references", 0) / metrics["seconds"]
    for i, row in enumerate(series):
        row.setdefault("step", i)
    return metrics, series


def run_device(cfg: DictConfig, requests: list, device: str, progress: bool) -> tuple[dict, list[dict]]:
    """The serving-loop replay on ``device`` with the real kernels and the memory manager."""
    import dataclasses

    from kvtriton.replay import device as dev

    r = cfg.replay
    fields = {f.name for f in dataclasses.fields(dev.DeviceReplayConfig)}
    knobs = dict(device=device, max_requests=None,  # already cut by build_workload
                 time_compression=float(r.time_compression), ignore_arrivals=bool(r.ignore_arrivals),
                 num_layers=cfg.model.num_layers, block_size=cfg.pool.block_size, dtype=cfg.model.dtype,
                 max_input_tokens=r.max_input_tokens, max_output_tokens=r.max_output_tokens,
                 max_batch=int(r.max_batch), prefill_s_per_token=float(r.prefill_s_per_token),
                 compaction_threshold=cfg.pool.compaction_threshold,
                 compaction_check_every=int(r.compaction_check_every),
                 chunk_bytes=int(float(cfg.pool.chunk_mb) * 2**20), record_every=int(r.series_every or 1),
                 seed=int(r.seed))
    knobs.update(plain(r.params) or {})
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ValueError(f"replay.params has keys the device replay does not take: {unknown}; "
                         f"valid keys: {sorted(fields)}")
    dcfg = dev.DeviceReplayConfig(**knobs)
    cap, budget = cfg.pool.capacity_blocks, cfg.pool.budget_mb
    size = {"budget_bytes": int(float(budget) * 2**20)} if budget is not None else {"capacity_blocks": int(cap)}
    model = None if cfg.model.preset == "per_request" else str(cfg.model.preset)
    out = dev.replay_device(requests, model, str(cfg.policy.name), config=dcfg,
                            progress=progress, policy_kwargs=plain(cfg.policy.params) or None, **size)
    metrics = {k: _scalar(v) for k, v in out.summary.items() if _is_scalar(v)}
    return metrics, _rows(out.timeseries)


# -------------------------------------------------------------------------------------- benchmarks

def bench_script(task: str) -> Path:
    return EXPERIMENTS_DIR / {"bench_kernels": "bench_kernels.py", "bench_memory": "bench_memory.py",
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
            if k != "results" and _is_scalar(v) and v is not None:
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
