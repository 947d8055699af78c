"""The one place where the harness calls the library: names, workloads, policies, replays, benchmarks.

Each function maps config nodes to the library's entry points (``kvtriton.workloads.make_workload``,
``kvtriton.policies``, ``kvtriton.replay.simulate`` / ``replay_device``, the benchmark scripts of a clone's
``experiments/``) and their results back to flat metric dicts and time-series rows. The device replay's
knobs go to ``DeviceReplayConfig`` as they are (``replay.<field>``), with no copy of its fields here.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .config import PROJECT_ROOT, ConfigError, device_knobs
from kvtriton.workloads.paths import MOONCAKE_FILES, mooncake_trace_path

log = logging.getLogger("kvtriton.harness")

def plain(node) -> Any:
    """A config node as plain Python (lists become tuples where the library expects ranges)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return tuple(plain(v) for v in node)
    return node


# ------------------------------------------------------------------------------------------ names

def model_presets() -> dict:
    from kvtriton.spec import PRESETS

    return PRESETS


def policy_names() -> list[str] | None:
    """Registered policy names and aliases (None while no policy is registered)."""
    from kvtriton.policies import available_policies

    return available_policies(include_aliases=True) or None


def canonical_policy(name: str) -> str | None:
    """The registered name of policy ``name`` (an alias maps to it), or None for an unknown name."""
    from kvtriton.policies import canonical_name

    try:
        return canonical_name(name)
    except ValueError:
        return None


def offline_policies() -> tuple[str, ...]:
    """Policies that need the trace's future (the fast replay only)."""
    from kvtriton.policies import offline_policies as offline

    return tuple(offline())


def workload_names() -> list[str]:
    from kvtriton import workloads

    return workloads.available_workloads()


# --------------------------------------------------------------------------------------- workload

def trace_file(wcfg) -> Path | None:
    """The trace file a Mooncake workload reads (None for synthetic workloads)."""
    name = str(wcfg.name).lower().replace("-", "_")
    if name not in MOONCAKE_FILES:
        return None
    if wcfg.trace_path:
        return Path(str(wcfg.trace_path))
    return mooncake_trace_path(name, str(wcfg.traces_dir) if wcfg.traces_dir else None)


def _workload_kwargs(cfg: DictConfig) -> tuple[str, dict]:
    name = str(cfg.workload.name).lower().replace("-", "_")
    params = dict(plain(cfg.workload.params) or {})
    limit = cfg.replay.max_requests
    if name in MOONCAKE_FILES:
        params = dict(params, path=str(trace_file(cfg.workload)))
        if limit is not None:
            params["limit"] = int(limit)
    else:
        params.setdefault("seed", int(cfg.workload.seed))
        if limit is not None and isinstance(params.get("num_requests"), int):  # generate no more than is replayed
            params["num_requests"] = min(int(params["num_requests"]), int(limit))
    return name, params


# The last few workloads built, with their build times, so that the checks and the run of one process
# (and the jobs of a sweep in one process) build each workload once.
_WORKLOADS: "OrderedDict[str, tuple[list, float]]" = OrderedDict()
_WORKLOADS_KEPT = 4


def _workload_key(name: str, kwargs: dict, limit) -> str:
    stamp = None
    if "path" in kwargs:
        try:
            st = os.stat(kwargs["path"])
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    return json.dumps([name, kwargs, limit, stamp], sort_keys=True, default=str)


def build_workload(cfg: DictConfig) -> list:
    """The request list of ``cfg.workload``, cut to ``cfg.replay.max_requests``.

    A bad parameter raises ``ConfigError`` naming ``workload.params.<key>`` (the generator's own check)."""
    from kvtriton.workloads import make_workload

    name, kwargs = _workload_kwargs(cfg)
    limit = cfg.replay.max_requests
    key = _workload_key(name, kwargs, limit)
    if key in _WORKLOADS:
        _WORKLOADS.move_to_end(key)
        return list(_WORKLOADS[key][0])
    t0 = time.perf_counter()
    try:
        reqs = make_workload(name, **kwargs)
    except (ValueError, TypeError) as e:
        raise _workload_error(cfg, name, kwargs, e) from e
    except OSError as e:
        raise ConfigError("workload.trace_path", kwargs.get("path"), f"a readable Mooncake JSONL file ({e})") from e
    reqs = reqs[:limit] if limit is not None else list(reqs)
    if not reqs:
        raise ConfigError("workload.params", plain(cfg.workload.params), f"parameters that give at least one "
                          f"request (workload {name!r} produced none)")
    _WORKLOADS[key] = (reqs, time.perf_counter() - t0)
    while len(_WORKLOADS) > _WORKLOADS_KEPT:
        _WORKLOADS.popitem(last=False)
    return list(reqs)


def workload_build_seconds(cfg: DictConfig) -> float | None:
    """How long building ``cfg``'s workload took (it is built once per process; see ``build_workload``)."""
    name, kwargs = _workload_kwargs(cfg)
    entry = _WORKLOADS.get(_workload_key(name, kwargs, cfg.replay.max_requests))
    return entry[1] if entry is not None else None


def _lead_name(message: str, names) -> str | None:
    """The argument a library error message is about (``"num_requests must be ..."``), if it names one."""
    m = re.match(r"\s*(?:config\.)?([A-Za-z_][A-Za-z0-9_]*)\b", str(message))
    return m.group(1) if m and m.group(1) in names else None


def _workload_error(cfg, name: str, kwargs: dict, e: Exception) -> ConfigError:
    user = plain(cfg.workload.params) or {}
    arg = _lead_name(e, kwargs)
    if arg == "path":
        return ConfigError("workload.trace_path", kwargs.get("path"), f"a valid Mooncake JSONL file ({e})")
    if arg == "seed" and "seed" not in user:
        return ConfigError("workload.seed", cfg.workload.seed, str(e))
    if arg is not None:
        return ConfigError(f"workload.params.{arg}", kwargs.get(arg), f"a value workload {name!r} accepts ({e})")
    return ConfigError("workload.params", user, f"parameters workload {name!r} accepts ({e})")


# ----------------------------------------------------------------------------------------- device

def resolve_device(spec: str, job_num: int | None = None, name: str = "replay.device") -> str:
    """``auto``: ``cuda:<job_num mod #GPUs>`` when CUDA is there (one job per GPU under a multi-process
    launcher), else ``cpu``; ``cuda`` alone means the current CUDA device. Explicit CUDA devices must exist
    (ValueError naming ``name`` and the valid values). ``kvtriton.devices.resolve_device`` decides."""
    from kvtriton.devices import resolve_device as _resolve

    return str(_resolve(str(spec), job_num, name=name))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def ops_backend(device: str) -> str:
    """What kvtriton's ops run on ``device`` in this thread: ``triton``, ``triton-interpreter`` (Triton's
    interpreter, ``TRITON_INTERPRET=1``) or ``reference`` (the plain-PyTorch references); see
    ``kvtriton/ops/_backend.py``."""
    import torch
    from kvtriton import ops

    if not ops.use_triton(torch.empty(0, device=device)):
        return "reference"
    from kvtriton.ops import _backend  # the interpreter flag as triton saw it when it was imported

    interpret = getattr(_backend, "INTERPRET", os.environ.get("TRITON_INTERPRET", "0") == "1")
    return "triton-interpreter" if interpret else "triton"


def runtime_info(cfg: DictConfig, device: str | None) -> dict:
    """What the run's config resolved to on this machine: the device (``host`` for the fast replay), its
    name, and the ops backend. Recorded in config.json / result.json; ``runtime_key`` of it is part of the
    skip-completed key, so that a run on another device or backend is not handed these results."""
    import torch

    task = getattr(cfg.task, "value", cfg.task)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    info: dict = {"task": str(task), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton is a Linux-only dependency
        info["triton"] = None
    if device is None:  # the fast replay: no tensors, no kernels
        info.update(device="host", device_type="host", device_name=_cpu_name(), backend="none")
        return info
    dtype = torch.device(device).type
    name = torch.cuda.get_device_name(torch.device(device)) if dtype == "cuda" else _cpu_name()
    if task == "replay":
        backend = ops_backend(device)
    else:  # the benchmark scripts run in a subprocess that inherits TRITON_INTERPRET
        backend = "triton-interpreter" if interpret else ("triton" if dtype == "cuda" else "reference")
    info.update(device=device, device_type=dtype, device_name=name, backend=backend, triton_interpret=interpret)
    return info


def runtime_key(info: Mapping) -> dict | None:
    """The part of ``runtime_info`` that decides whether results carry over: device type and model and
    the ops backend (not the device index: identical GPUs give interchangeable results). None for the fast
    replay, whose results depend on the config alone."""
    if info.get("device") == "host":
        return None
    return {k: info.get(k) for k in ("device_type", "device_name", "backend")}


# ------------------------------------------------------------------------------------------ checks

# Arguments the harness passes itself, with the config key that sets each.
_WORKLOAD_OWN = {"trace": {"path": "workload.trace_path", "traces_dir": "workload.traces_dir",
                           "limit": "replay.max_requests"},
                 "synthetic": {"seed": "workload.seed"}}
_POLICY_OWN = {"capacity": "pool.capacity_blocks", "future": "the fast replay, from the workload"}
_FAST_OWN = {"policy_kwargs": "policy.params", "requests": None, "policy": "policy.name",
             "capacity_blocks": "pool.capacity_blocks", "progress": "replay.progress"}


def _arg_names(fn) -> tuple[list[str], list[str]] | None:
    """(keyword arguments, required ones) of ``fn``; None where it takes ``**kwargs`` (any name)."""
    sig = inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    names = [n for n, p in sig.parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
             and not n.startswith("_")]
    required = [n for n in names if sig.parameters[n].default is inspect.Parameter.empty]
    return names, required


def _check_names(prefix: str, given: Mapping, valid: list[str], own: Mapping[str, str | None], what: str) -> None:
    """ConfigError for the first key of ``given`` that is not in ``valid`` (or is one the harness sets)."""
    for k in given:
        if k in own:
            where = own[k]
            hint = (f"set {where} instead" if where and re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", where)
                    else f"it is set by {where or 'the harness'}")
            raise ConfigError(f"{prefix}.{k}", given[k], "", message=(
                f"config key {prefix}.{k} is not accepted: {hint} ({what} takes "
                f"{', '.join(valid) if valid else 'no parameters'} in {prefix})"))
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            raise ConfigError(f"{prefix}.{k}", given[k], "", message=(
                f"unknown config key {prefix}.{k}={given[k]!r}: {what} takes "
                + (f"{', '.join(valid)} in {prefix}" if valid else f"no parameters in {prefix}")
                + (f" (did you mean {prefix}.{close[0]}?)" if close else "")))


def policy_class(name: str):
    from kvtriton.policies import make_policy

    return type(make_policy(canonical_policy(name) or name))


def check_params(cfg: DictConfig) -> None:
    """Check ``workload.params``, ``policy.params`` and ``replay.params`` against what the generator, the
    policy's constructor and the replay take (names from their signatures; values by the library's own
    checks where they cost nothing). Raise ``ConfigError`` naming the key and the valid ones."""
    # workload.params: names (the values are checked when the workload is built)
    from kvtriton.workloads import WORKLOADS

    wname = str(cfg.workload.name).lower().replace("-", "_")
    wparams = plain(cfg.workload.params) or {}
    if not isinstance(wparams, dict):
        raise ConfigError("workload.params", wparams, "a mapping of the generator's keyword arguments")
    fn = WORKLOADS.get(wname)
    own = _WORKLOAD_OWN["trace" if wname in MOONCAKE_FILES else "synthetic"]
    args = _arg_names(fn) if fn is not None else None
    if args is not None:
        names, required = args
        _check_names("workload.params", wparams, [n for n in names if n not in own], own,
                     f"workload {wname!r}" + ("" if wname in MOONCAKE_FILES else f" ({fn.__name__})"))
        missing = [n for n in required if n not in wparams and n not in own]
        if missing:
            raise ConfigError(f"workload.params.{missing[0]}", None, f"a value: workload {wname!r} needs "
                              f"{', '.join('workload.params.' + m for m in missing)}")

    # policy.params: names, then the constructor's own checks
    pname = canonical_policy(str(cfg.policy.name))
    pparams = plain(cfg.policy.params) or {}
    if not isinstance(pparams, dict):
        raise ConfigError("policy.params", pparams, "a mapping of the policy constructor's keyword arguments")
    if pname is not None:
        from kvtriton.policies import make_policy

        cls = policy_class(pname)
        args = _arg_names(cls)
        if args is not None:
            _check_names("policy.params", pparams, [n for n in args[0] if n not in _POLICY_OWN], _POLICY_OWN,
                         f"policy {pname!r} ({cls.__name__})")
        if pparams:
            cap = cfg.pool.capacity_blocks
            try:
                make_policy(pname, capacity=cap if isinstance(cap, int) and cap > 0 else None, **pparams)
            except (TypeError, ValueError) as e:
                arg = _lead_name(e, pparams)
                raise ConfigError(f"policy.params.{arg}" if arg else "policy.params",
                                  pparams.get(arg) if arg else pparams,
                                  f"a value policy {pname!r} accepts ({e})") from e

    # replay.params
    rparams = plain(cfg.replay.params) or {}
    if not isinstance(rparams, dict):
        raise ConfigError("replay.params", rparams, "a mapping of the replay's keyword arguments")
    if getattr(cfg.task, "value", cfg.task) != "replay":
        return
    if getattr(cfg.replay.mode, "value", cfg.replay.mode) == "fast":
        from kvtriton.replay import fast

        args = _arg_names(fast.simulate)
        if args is not None:
            _check_names("replay.params", rparams, [n for n in args[0] if n not in _FAST_OWN], _FAST_OWN,
                         "the fast replay (kvtriton.replay.fast.simulate)")
        if "order" in rparams and rparams["order"] not in fast.ORDERS:
            raise ConfigError("replay.params.order", rparams["order"], f"one of {', '.join(fast.ORDERS)}")
        every = rparams.get("sample_every")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError("replay.params.sample_every", every, "a positive integer or null (about 200 points)")
    elif rparams:  # the device replay's knobs are keys of their own; its checks ran in validate()
        knobs = [f.name for f in device_knobs()]
        _check_names("replay.params", rparams, [], {k: f"replay.{k}" for k in knobs},
                     "the device replay (its knobs are replay.<field>: " + ", ".join(knobs) + ")")


def check_capacity(cfg: DictConfig, requests: list) -> None:
    """ConfigError where the pool cannot hold the workload's largest request (the replay would refuse
    it only after the run has started)."""
    if getattr(cfg.task, "value", cfg.task) != "replay" or not requests:
        return
    name = str(cfg.workload.name)
    if getattr(cfg.replay.mode, "value", cfg.replay.mode) == "fast":
        cap = cfg.pool.capacity_blocks
        biggest = max(requests, key=lambda r: len(r.hash_ids))
        need = max(1, len(biggest.hash_ids))
        if cap is not None and cap < need:
            raise ConfigError("pool.capacity_blocks", cap, (
                f"at least {need}: request_id={biggest.request_id} of workload {name!r} holds {need} blocks "
                f"(of {getattr(biggest, 'block_tokens', '?')} tokens), and a running request's blocks are pinned"))
        return
    for pool, need, block_bytes, why in _device_needs(cfg, requests):
        if cfg.pool.budget_mb is not None:
            budget = cfg.pool.budget_mb
            if need > int(float(budget) * 2**20) // block_bytes:
                raise ConfigError("pool.budget_mb", budget, f"at least {need * block_bytes / 2**20:.4g} (MB): {why}")
        elif cfg.pool.capacity_blocks is not None and need > cfg.pool.capacity_blocks:
            raise ConfigError("pool.capacity_blocks", cfg.pool.capacity_blocks, f"at least {need}: {why}")


_NEEDS: "OrderedDict[str, list]" = OrderedDict()  # a sweep over capacities and policies computes each once


def _device_needs(cfg: DictConfig, requests: list) -> list[tuple[str, int, int, str]]:
    """``(pool, blocks its largest request needs, bytes per block, explanation)`` for each model pool of
    the device replay, by the replay's own scale-down of the requests (nothing touches a device)."""
    from kvtriton.replay.sequences import prepare_sequences, resolve_models  # the replay's own preparation

    name = str(cfg.workload.name)
    wname, kwargs = _workload_kwargs(cfg)
    model = None if cfg.model.preset == "per_request" else str(cfg.model.preset)
    key = json.dumps([_workload_key(wname, kwargs, cfg.replay.max_requests), model, cfg.replay.num_layers,
                      cfg.replay.dtype, cfg.replay.block_size, cfg.replay.max_input_tokens,
                      cfg.replay.max_output_tokens], default=str)
    if key in _NEEDS:
        _NEEDS.move_to_end(key)
        return _NEEDS[key]
    try:
        dcfg = device_replay_config(cfg, "cpu")
        if model is None:
            names = {getattr(r, "model", None) for r in requests}
            if None in names or not names:
                raise ConfigError("model.preset", "per_request", (
                    f"a workload whose requests name their model (e.g. workload=design_mix), or one preset "
                    f"({', '.join(sorted(model_presets()))}): requests of workload {name!r} have no model"))
            specs, by_request = resolve_models({n: n for n in sorted(names, key=str)}, dcfg)
        else:
            specs, by_request = resolve_models(model, dcfg)
        seqs = prepare_sequences(requests, dcfg, specs, by_request)
    except AttributeError:  # pragma: no cover - the replay changed shape; it still refuses at run time
        return []
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError("workload", name, f"requests the device replay can serve ({e})") from e
    needs = []
    for pool, spec in specs.items():
        mine = [q for q in seqs if q.model == pool]
        if not mine:
            continue
        big = max(mine, key=lambda q: q.max_tokens)
        need = spec.blocks_for_tokens(big.max_tokens)
        needs.append((pool, need, spec.bytes_per_block,
                      f"request_id={big.req.request_id} of workload {name!r} holds {big.max_tokens} tokens = "
                      f"{need} blocks of {spec.block_size} tokens ({spec.name}); or cap replay.max_input_tokens / "
                      f"replay.max_output_tokens"))
    _NEEDS[key] = needs
    while len(_NEEDS) > 8:
        _NEEDS.popitem(last=False)
    return needs


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


def block_unit(requests) -> int | None:
    """Tokens per block of a workload (its requests' ``block_tokens``; None where they differ)."""
    units = {getattr(r, "block_tokens", None) for r in requests}
    return units.pop() if len(units) == 1 and None not in units else None


def _capacity_unit(metrics: dict, block_tokens) -> None:
    """``block_tokens`` and ``capacity_tokens`` beside ``capacity_blocks``, so that a fast and a device
    result (512-token workload blocks, ``block_size``-token pool blocks) compare."""
    cap = metrics.get("capacity_blocks")
    metrics["block_tokens"] = int(block_tokens) if block_tokens else None
    metrics["capacity_tokens"] = (int(cap) * int(block_tokens) if isinstance(cap, int) and cap > 0 and block_tokens
                                  else None)


def run_fast(cfg: DictConfig, requests: list, progress: bool) -> tuple[dict, list[dict]]:
    """The fast (tensor-free) prefix-cache simulation of ``cfg.policy`` at ``cfg.pool.capacity_blocks``.

    ``replay.params`` go to ``simulate`` (``order``; ``sample_every``: a series point every N requests,
    by default about 200 points)."""
    from kvtriton.replay import fast

    params = dict(plain(cfg.replay.params) or {})
    every = params.pop("sample_every", None) or max(1, len(requests) // 200)
    kwargs = dict(sample_every=int(every), policy_kwargs=plain(cfg.policy.params) or None, **params)
    if "progress" in inspect.signature(fast.simulate).parameters:
        kwargs["progress"] = progress
    out = fast.simulate(requests, str(cfg.policy.name), int(cfg.pool.capacity_blocks), **kwargs)
    metrics, series = _split(out)
    if metrics.get("seconds"):
        metrics["sim_block_refs_per_s"] = metrics.get("references", 0) / metrics["seconds"]
    _capacity_unit(metrics, block_unit(requests))
    for i, row in enumerate(series):
        row.setdefault("step", i)
    return metrics, series


def replay_knobs(cfg: DictConfig) -> dict:
    """``replay.<field>`` for every field of ``DeviceReplayConfig``, as plain values."""
    return {f.name: plain(cfg.replay[f.name]) for f in device_knobs()}


def device_replay_config(cfg: DictConfig, device: str):
    """The ``DeviceReplayConfig`` of ``cfg`` on ``device``: its fields are ``replay.<field>`` as they are."""
    from kvtriton.replay import DeviceReplayConfig

    return DeviceReplayConfig(**dict(replay_knobs(cfg), device=device))


def run_device(cfg: DictConfig, requests: list, device: str, progress: bool) -> tuple[dict, list[dict]]:
    """The serving-loop replay on ``device`` with the real kernels and the memory manager."""
    from kvtriton.replay import replay_device

    dcfg = device_replay_config(cfg, device)
    cap, budget = cfg.pool.capacity_blocks, cfg.pool.budget_mb
    size = {"budget_bytes": int(float(budget) * 2**20)} if budget is not None else {"capacity_blocks": int(cap)}
    model = None if cfg.model.preset == "per_request" else str(cfg.model.preset)
    out = replay_device(requests, model, str(cfg.policy.name), config=dcfg,
                        progress=progress, policy_kwargs=plain(cfg.policy.params) or None, **size)
    metrics = {k: _scalar(v) for k, v in out.summary.items() if _is_scalar(v)}
    _capacity_unit(metrics, metrics.get("block_size") or None)
    return metrics, _rows(out.timeseries)


# Timings: what a repeat measures anew (seconds, rates, shares of step time). ``combine_repeats`` gives each
# its spread over the repeats.
_TIMING = re.compile(r"(^seconds$|_s$|_s_(mean|p\d+)$|_per_s$|_frac$)")


def is_timing(key: str) -> bool:
    """Whether metric ``key`` is a measured time, rate or share of time (it varies between repeats)."""
    return bool(_TIMING.search(key))


def combine_repeats(runs: list[tuple[dict, list[dict]]]) -> tuple[dict, list[dict]]:
    """One result from ``repeats`` runs of one config: each number is the median over the runs, and every
    timing (``is_timing``), and any other number that differed between runs, gets ``<key>_min``,
    ``<key>_max`` and ``<key>_std`` (sample standard deviation) beside it; ``repeats`` says how many. The
    time series is the first run's."""
    import statistics

    first, series = runs[0]
    out = dict(first)
    out["repeats"] = len(runs)
    if len(runs) == 1:
        return out, series
    for key, v in first.items():
        values = [m.get(key) for m, _ in runs]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            continue
        same = len(set(values)) == 1
        out[key] = values[0] if same else statistics.median(values)
        if is_timing(key) or not same:
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
            out[f"{key}_std"] = statistics.stdev(values)
    return out, series


# -------------------------------------------------------------------------------------- benchmarks

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
