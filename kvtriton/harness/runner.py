"""One run of the harness: validate, skip if already complete, build, replay or benchmark, store, log.

``execute(cfg, run_dir, ...)`` needs no Hydra (tests and notebooks call it on configs from the compose
API); ``run_from_hydra(cfg)`` takes the output directory, overrides and job number from Hydra.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from . import adapters, store
from .config import Task, validate
from .telemetry import setup_telemetry

log = logging.getLogger("kvtriton.harness")


def resolved_config(cfg: DictConfig) -> dict:
    """The config as plain data with interpolations resolved and enums as their names (no ``hydra`` node),
    the policy under its registered name (``policy.name=adaptive`` is stored, hashed and logged as ``arc``;
    the overrides keep what was typed)."""
    data = {}
    for key in cfg.keys():
        if key == "hydra":  # Hydra's own node holds values only a launched job has (hydra.job.num, ...)
            continue
        value = OmegaConf.select(cfg, str(key), throw_on_missing=True)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True, enum_to_str=True, throw_on_missing=True)
        elif isinstance(value, enum.Enum):
            value = value.name
        data[key] = value
    pol = data.get("policy")
    if isinstance(pol, dict) and isinstance(pol.get("name"), str):
        pol["name"] = adapters.canonical_policy(pol["name"]) or pol["name"]
    return data


def _progress_enabled(cfg) -> bool:
    return bool(cfg.replay.progress)


def _task_device(cfg: DictConfig, job_num: int | None) -> str | None:
    """The device the run computes on (None for the fast replay, which has no tensors)."""
    task = cfg.task if isinstance(cfg.task, Task) else Task(cfg.task)
    if task is Task.replay:
        return None if cfg.replay.mode.value == "fast" else adapters.resolve_device(cfg.replay.device, job_num)
    if task is Task.token_eviction:
        return adapters.resolve_device(cfg.quality.device, job_num, name="quality.device")
    return adapters.resolve_device(cfg.bench.device, job_num, name="bench.device")


def _run_task(cfg: DictConfig, run_dir: Path, device: str | None, telemetry) -> tuple[dict, list, dict]:
    task = cfg.task if isinstance(cfg.task, Task) else Task(cfg.task)
    if task is Task.replay:
        t0 = time.perf_counter()
        requests = adapters.build_workload(cfg)  # built by validate() already, in this process
        t_load = adapters.workload_build_seconds(cfg)
        t_load = time.perf_counter() - t0 if t_load is None else t_load
        repeats = int(cfg.replay.repeats)
        if cfg.replay.mode.value == "fast":
            runs = [adapters.run_fast(cfg, requests, _progress_enabled(cfg)) for _ in range(repeats)]
            metrics, series = adapters.combine_repeats(runs)
            metrics["device"] = "host"
        else:
            if device.startswith("cuda"):
                import torch

                # Triton launches on the current device, so it must be the one the tensors live on
                torch.cuda.set_device(torch.device(device))
            runs = [adapters.run_device(cfg, requests, device, _progress_enabled(cfg)) for _ in range(repeats)]
            metrics, series = adapters.combine_repeats(runs)
            metrics.setdefault("device", _device_name(device))
        metrics["workload_load_s"] = t_load
        return metrics, series, {}
    if task is Task.token_eviction:
        metrics, tables = adapters.run_quality(cfg, device)
        return metrics, [], tables
    metrics, tables = adapters.run_bench(cfg, task.value, run_dir, device)
    return metrics, [], tables


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def execute(cfg: DictConfig, run_dir, *, overrides: Iterable[str] = (), job_num: int | None = None,
            group: str | None = None, run_name: str | None = None, cwd: Path | None = None) -> dict:
    """Run the experiment ``cfg`` with its outputs in ``run_dir`` and return its result record.

    Every check (``validate``: keys, values, devices, the workload against the pool) comes before
    anything is written. The run then claims ``run_dir`` (``store.RunDirBusy`` if another run owns it),
    writes the resolved config, runs, and writes the metrics, all atomically, before anything is sent to
    W&B; the ``COMPLETE`` marker comes last. With ``results.skip_completed``, a run whose key (the config
    hash with the device and ops backend it resolves to here) has a complete result, here or in the
    index, is not run again: the record is copied.
    """
    validate(cfg)
    run_dir = Path(run_dir)
    overrides = list(overrides)
    resolved = resolved_config(cfg)
    device = _task_device(cfg, job_num)
    runtime = adapters.runtime_info(cfg, device)
    h = store.config_hash(resolved, adapters.runtime_key(runtime))
    index_dir = Path(cfg.results.index_dir)
    if not index_dir.is_absolute():
        index_dir = (cwd or Path.cwd()) / index_dir
    job = {"num": job_num, "group": group, "name": run_name}

    rs = store.RunStore(run_dir, cfg.results.format.value)
    if cfg.results.skip_completed:
        if store.is_complete(run_dir, h):
            log.info("skipping: %s already holds complete results for config %s", run_dir, h)
            return store.read_result(run_dir)
        prev = store.index_lookup(index_dir, h)
        if prev is not None and prev.resolve() != run_dir.resolve():
            rs.begin(resolved, h, overrides, job, runtime)
            try:
                result = rs.adopt(prev)
            finally:
                rs.release()
            log.info("skipping: config %s already complete in %s (results copied)", h, prev)
            print(f"[kvtriton] skipped {run_name or run_dir}: complete in {prev}", file=sys.stderr)
            return result

    rs.begin(resolved, h, overrides, job, runtime)
    try:
        telemetry = setup_telemetry(cfg.telemetry, {"kvtriton.run": run_name or "default"})
        t0 = time.perf_counter()
        try:
            if telemetry.enabled:
                with telemetry.tracer().start_as_current_span(
                        "kvtriton.harness.run", attributes={"task": str(cfg.task.value), "config_hash": h,
                                                            "policy": str(cfg.policy.name),
                                                            "workload": str(cfg.workload.name)}):
                    metrics, series, tables = _run_task(cfg, run_dir, device, telemetry)
            else:
                metrics, series, tables = _run_task(cfg, run_dir, device, telemetry)
            metrics["wall_s"] = time.perf_counter() - t0
            if telemetry.enabled:
                _record_run_metrics(cfg, metrics, h)
        finally:
            telemetry.shutdown()
        result = rs.finish(metrics, series, tables)
    finally:
        rs.release()  # a no-op after finish; "failed" otherwise
    store.index_add(index_dir, h, run_dir)

    if cfg.logger.kind.value == "wandb":
        files = [run_dir / store.RESULT_FILE] + ([run_dir / result["series_file"]] if result.get("series_file") else [])
        try:
            from .wandb_log import log_run

            info = log_run(cfg.logger, run_dir=run_dir, resolved=dict(resolved, _config_hash=h),
                           name=run_name or "default", group=group, metrics=metrics, series=series,
                           tables=tables, result_files=files, job_type=str(cfg.task.value))
            result["wandb"] = info
            store.atomic_write_json(run_dir / "wandb.json", info)
        except Exception:  # results are already on disk; W&B trouble must not fail the run
            log.warning("W&B logging failed (results are in %s):\n%s", run_dir, traceback.format_exc())
    _print_summary(run_name, metrics)  # last, so that it stays visible below any W&B output
    return result


def _record_run_metrics(cfg, metrics: dict, cfg_hash: str) -> None:
    from opentelemetry import metrics as otel_metrics

    meter = otel_metrics.get_meter("kvtriton.harness")
    attrs = {"task": str(cfg.task.value), "policy": str(cfg.policy.name), "workload": str(cfg.workload.name),
             "mode": str(cfg.replay.mode.value), "config_hash": cfg_hash}
    meter.create_histogram("kvtriton.harness.run.duration", unit="s",
                           description="Wall time of one harness run").record(metrics["wall_s"], attrs)
    for key in ("hit_rate", "token_hit_rate"):
        if isinstance(metrics.get(key), (int, float)):
            meter.create_histogram(f"kvtriton.harness.{key}", unit="1",
                                   description=f"{key} of a finished run").record(float(metrics[key]), attrs)


_SUMMARY_KEYS = ("quality_task", "strategy", "budget", "accuracy", "perplexity", "kv_tokens_held", "policy", "capacity_blocks", "block_tokens", "hit_rate", "token_hit_rate", "evictions",
                 "preemptions", "decode_tokens_per_s", "ttft_s_p50", "step_memory_frac", "targets_met", "repeats",
                 "wall_s")


def _print_summary(name, metrics) -> None:
    parts = []
    keys = _SUMMARY_KEYS[:6] + ("wall_s",) if "quality_task" in metrics else _SUMMARY_KEYS[6:]
    for k in keys:
        v = metrics.get(k)
        if v is not None and not (k == "repeats" and v == 1):
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    print(f"[kvtriton] {name or 'run'}: " + " ".join(parts), file=sys.stderr)


def run_from_hydra(cfg: DictConfig) -> dict:
    """The Hydra task function's body: take output dir, overrides and job number from HydraConfig."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    multirun = hc.mode == RunMode.MULTIRUN
    job_num = hc.job.num if multirun else None
    group = str(hc.sweep.dir) if multirun else None
    name = hc.job.override_dirname or "default"
    result = execute(cfg, run_dir, overrides=overrides, job_num=job_num, group=group, run_name=name,
                     cwd=Path(hc.runtime.cwd))
    return result.get("metrics", {})
