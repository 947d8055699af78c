"""Request streams: the Mooncake trace loader, seeded synthetic generators and a registry by name.

``make_workload(name, **kwargs)`` builds any of them by name (the names configs use):

- ``mooncake_conversation`` / ``mooncake_synthetic``: the Mooncake traces. ``path`` (a file) or
  ``traces_dir`` (the folder holding ``conversation_trace.jsonl`` and ``synthetic_trace.jsonl``; default:
  ``$KVTRITON_TRACES``, else ``shared/traces/mooncake`` beside the project: see ``paths.py``), ``limit`` (first N requests).
- ``zipf``: ``zipf_prefix_workload``; ``multiturn``: ``multiturn_workload``; ``design_mix``:
  ``design_mix_workload`` (their keyword arguments pass through).
"""

from __future__ import annotations

import inspect

from .mooncake import load_mooncake
from .paths import MOONCAKE_FILES, default_traces_dir, mooncake_trace_path
from .request import Request
from .synthetic import design_cache_tokens, design_mix_workload, multiturn_workload, zipf_prefix_workload



def _mooncake(name):
    def load(path=None, traces_dir=None, limit=None):
        if path is None:
            path = mooncake_trace_path(name, traces_dir)
        return load_mooncake(path, limit=limit)

    load.__doc__ = f"Load the Mooncake {MOONCAKE_FILES[name]} (``path`` or ``traces_dir``, ``limit``)."
    return load


WORKLOADS = {
    "mooncake_conversation": _mooncake("mooncake_conversation"),
    "mooncake_synthetic": _mooncake("mooncake_synthetic"),
    "zipf": zipf_prefix_workload,
    "multiturn": multiturn_workload,
    "design_mix": design_mix_workload,
}


def available_workloads() -> list[str]:
    return sorted(WORKLOADS)


def make_workload(name: str, **kwargs) -> list[Request]:
    """Build the workload registered as ``name`` (see ``available_workloads()``) with ``kwargs``.

    Unknown names raise ValueError listing the valid ones. Synthetic workloads need their size
    (``num_requests``, or ``num_sessions`` for ``multiturn``).
    """
    key = str(name).lower().replace("-", "_")
    if key not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid workloads: {', '.join(available_workloads())}")
    fn = WORKLOADS[key]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for workload {key!r}; valid parameters: "
                         f"{', '.join(params)}")
    return fn(**kwargs)


__all__ = ["Request", "load_mooncake", "zipf_prefix_workload", "multiturn_workload", "design_mix_workload",
           "design_cache_tokens", "make_workload", "available_workloads", "WORKLOADS", "default_traces_dir",
           "mooncake_trace_path", "MOONCAKE_FILES"]
