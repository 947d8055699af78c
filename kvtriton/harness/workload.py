"""The workload a config names, built once per process: the generator's arguments from ``workload.*`` and
``replay.max_requests``, the trace file (Mooncake's JSONL, the agentic traces' archive), and library errors
mapped to the config key at fault."""

from __future__ import annotations

import json
import os
import re
import time
from collections import OrderedDict
from pathlib import Path

from omegaconf import DictConfig

from .config import ConfigError, plain
from kvtriton.workloads.paths import MOONCAKE_FILES, agentic_trace_path, mooncake_trace_path

# Trace workloads that are not Mooncake's: their file from workload.trace_path / workload.traces_dir, their
# arrival seed from workload.seed; replay.max_requests cuts their (arrival-sorted) requests.
_AGENTIC = ("{} agentic traces (claude_code_traces.tgz or an unpacked folder of trace files; "
            "github.com/callanjfox/kv-cache-tester, folder traces/)", agentic_trace_path)
_OTHER_TRACES = {"agentic": _AGENTIC, "agentic_native": _AGENTIC}


def _trace_what(name: str, adjective: str) -> str:
    """What a trace workload's file must be, for error messages (``"readable"``, ``"valid"``)."""
    return _OTHER_TRACES[name][0].format(adjective) if name in _OTHER_TRACES else f"a {adjective} Mooncake JSONL file"


def trace_file(wcfg) -> Path | None:
    """The trace file a trace workload reads (None for synthetic workloads)."""
    name = str(wcfg.name).lower().replace("-", "_")
    if name not in MOONCAKE_FILES and name not in _OTHER_TRACES:
        return None
    if wcfg.trace_path:
        return Path(str(wcfg.trace_path))
    folder = str(wcfg.traces_dir) if wcfg.traces_dir else None
    if name in _OTHER_TRACES:
        return _OTHER_TRACES[name][1](folder)
    return mooncake_trace_path(name, folder)


def _workload_kwargs(cfg: DictConfig) -> tuple[str, dict]:
    name = str(cfg.workload.name).lower().replace("-", "_")
    params = dict(plain(cfg.workload.params) or {})
    limit = cfg.replay.max_requests
    if name in _OTHER_TRACES:
        if params.get("path") is None and params.get("traces_dir") is None:
            params["path"] = str(trace_file(cfg.workload))
        params.setdefault("seed", int(cfg.workload.seed))
    elif name in MOONCAKE_FILES:
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
        raise ConfigError("workload.trace_path", kwargs.get("path"), f"{_trace_what(name, 'readable')} ({e})") from e
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
    if name in _OTHER_TRACES and kwargs.get("path") and str(e).startswith(str(kwargs["path"])):
        arg = "path"   # a fault in the trace data: its messages start with the file
    if arg == "path":
        return ConfigError("workload.trace_path", kwargs.get("path"), f"{_trace_what(name, 'valid')} ({e})")
    if arg == "seed" and "seed" not in user:
        return ConfigError("workload.seed", cfg.workload.seed, str(e))
    if arg is not None:
        return ConfigError(f"workload.params.{arg}", kwargs.get(arg), f"a value workload {name!r} accepts ({e})")
    return ConfigError("workload.params", user, f"parameters workload {name!r} accepts ({e})")
