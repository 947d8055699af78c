"""The one place where the harness calls the library: names, workloads, policies, replays, benchmarks.

Each function maps config nodes to the library's entry points (``kvtriton.workloads.make_workload``,
``kvtriton.policies``, ``kvtriton.replay.simulate`` / ``replay_device``, the benchmark scripts of a clone's
``experiments/``) and their results back to flat metric dicts and time-series rows. The device replay's
knobs go to ``DeviceReplayConfig`` as they are (``replay.<field>``), with no copy of its fields here.

The functions live in one module per concern; the rest of the harness calls them through this one:

* ``names``: the library's registered model presets, policies and workloads;
* ``workload``: the workload a config names, built once per process;
* ``runtime``: the device a run resolves to and what it ran on;
* ``param_checks``: the ``*.params`` and the pool checked against the library before a run;
* ``replays``: the fast and the device replay, their metrics and series, repeats combined;
* ``benchmarks``: the benchmark scripts of ``experiments/``;
* ``kvtriton.quality``: task=token_eviction, one quality evaluation (``run_quality`` below).
"""

from __future__ import annotations

from .benchmarks import bench_script, experiments_dir, run_bench, script_has_flag
from .config import plain
from .names import canonical_policy, model_presets, offline_policies, policy_class, policy_names, workload_names
from .param_checks import check_capacity, check_params
from .replays import (block_unit, combine_repeats, device_replay_config, is_timing, replay_knobs, run_device,
                      run_fast)
from .runtime import ops_backend, resolve_device, runtime_key
from .runtime import runtime_info as _runtime_info
from .workload import build_workload, trace_file, workload_build_seconds

__all__ = ["bench_script", "block_unit", "build_workload", "canonical_policy", "check_capacity", "check_params",
           "combine_repeats", "device_replay_config", "experiments_dir", "is_timing", "model_presets",
           "offline_policies", "ops_backend", "plain", "policy_class", "policy_names", "replay_knobs",
           "resolve_device", "run_bench", "run_device", "run_fast", "runtime_info", "runtime_key",
           "script_has_flag", "trace_file", "workload_build_seconds", "workload_names", "run_quality",
           "quality_config"]

# Metrics of a quality evaluation renamed where load_results has a column of that name.
_QUALITY_RENAMES = {"task": "quality_task", "model": "quality_model"}


def runtime_info(cfg, device):
    """``runtime.runtime_info``, with the ops backend of a token-eviction run (it runs in this process,
    as a device replay does)."""
    info = _runtime_info(cfg, device)
    if getattr(cfg.task, "value", cfg.task) == "token_eviction" and device is not None:
        info["backend"] = ops_backend(device)
    return info


def quality_config(cfg):
    """The ``quality`` section as a ``kvtriton.quality.QualityConfig``."""
    from kvtriton.quality.config import QualityConfig

    knobs = plain(cfg.quality)
    knobs["strategy_kwargs"] = dict(knobs.get("strategy_kwargs") or {})
    return QualityConfig(**knobs)


def run_quality(cfg, device: str) -> tuple[dict, dict]:
    """task=token_eviction: ``kvtriton.quality.evaluate_config`` of the ``quality`` section on ``device``;
    (metrics, tables): the flat row (``task`` as ``quality_task``, ``model`` as ``quality_model``) and the
    table ``samples`` (each prompt's answer and output, or each window's perplexity)."""
    import json

    from kvtriton.quality.evaluate import evaluate_config

    row = evaluate_config(quality_config(cfg), device)
    metrics = {_QUALITY_RENAMES.get(k, k): v for k, v in row.items() if k not in ("answers", "window_perplexity")}
    if "answers" in row:
        samples = json.loads(row["answers"])
    else:
        samples = [{"window": i, "perplexity": p} for i, p in enumerate(json.loads(row.get("window_perplexity", "[]")))]
    return metrics, {"samples": samples}
