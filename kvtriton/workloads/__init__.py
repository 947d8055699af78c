"""Request streams: the trace loaders (Mooncake, agentic coding), seeded synthetic generators and a registry by name.

``make_workload(name, **kwargs)`` builds any of them by name (the names configs use):

- ``mooncake_conversation`` / ``mooncake_synthetic``: the Mooncake traces. ``path`` (a file) or
  ``traces_dir`` (the folder holding ``conversation_trace.jsonl`` and ``synthetic_trace.jsonl``; default:
  ``$KVTRITON_TRACES``, else ``shared/traces/mooncake`` beside the project: see ``paths.py``), ``limit`` (first N requests).
- ``agentic`` / ``agentic_native``: the agentic coding traces (``load_agentic``) in blocks of 512 / 64
  tokens by default: ``path`` (the ``claude_code_traces.tgz`` archive or an unpacked folder) or
  ``traces_dir`` (default: ``$KVTRITON_AGENTIC_TRACES``, else ``shared/traces/weka-agentic`` beside the
  project), ``limit`` (first N conversations), and ``load_agentic``'s keyword arguments
  (``arrival_rate``, ``seed``, ``block_tokens``, ``coarsen``, ``shared_prefix``, ``subagents``,
  ``progress``).
- ``zipf``: ``zipf_prefix_workload``; ``multiturn``: ``multiturn_workload``; ``design_mix``:
  ``design_mix_workload`` (their keyword arguments pass through).
"""

from __future__ import annotations

import inspect

from .agentic import DEFAULT_COARSEN, load_agentic
from .mooncake import load_mooncake
from .paths import MOONCAKE_FILES, agentic_trace_path, default_traces_dir, mooncake_trace_path
from .request import Request
from .synthetic import design_cache_tokens, design_mix_workload, multiturn_workload, zipf_prefix_workload



def _mooncake(name):
    def load(path=None, traces_dir=None, limit=None):
        if path is None:
            path = mooncake_trace_path(name, traces_dir)
        return load_mooncake(path, limit=limit)

    load.__doc__ = f"Load the Mooncake {MOONCAKE_FILES[name]} (``path`` or ``traces_dir``, ``limit``)."
    return load


def _agentic(native: bool):
    def load(path=None, traces_dir=None, limit=None, *, arrival_rate=0.1, seed=0,
             block_tokens=64 if native else 512, coarsen=DEFAULT_COARSEN, shared_prefix=False, subagents=False,
             progress=False):
        if path is None:
            path = agentic_trace_path(traces_dir)
        return load_agentic(path, arrival_rate=arrival_rate, seed=seed, block_tokens=block_tokens, coarsen=coarsen,
                            shared_prefix=shared_prefix, subagents=subagents, limit=limit, progress=progress)

    load.__doc__ = (f"Load the agentic coding traces in blocks of {64 if native else 512} tokens by default "
                    f"(``path`` or ``traces_dir``, ``limit`` conversations; the rest as ``load_agentic``).")
    return load


WORKLOADS = {
    "mooncake_conversation": _mooncake("mooncake_conversation"),
    "mooncake_synthetic": _mooncake("mooncake_synthetic"),
    "agentic": _agentic(native=False),
    "agentic_native": _agentic(native=True),
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


__all__ = ["Request", "load_mooncake", "load_agentic", "agentic_trace_path", "zipf_prefix_workload",
           "multiturn_workload", "design_mix_workload", "design_cache_tokens", "make_workload",
           "available_workloads", "WORKLOADS", "default_traces_dir", "mooncake_trace_path", "MOONCAKE_FILES"]
