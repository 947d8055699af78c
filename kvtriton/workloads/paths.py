"""Where the public traces are read from: one rule for the library, the harness, the scripts and the tests.

``$KVTRITON_TRACES`` names the Mooncake folder when set. Otherwise the folder is ``shared/traces/mooncake``
beside the project: first relative to the working directory (``../shared/traces/mooncake``, the layout
of a checkout run from its root), then relative to this source tree. The traces are never shipped with
the project.
"""

from __future__ import annotations

import os
from pathlib import Path

MOONCAKE_FILES = {"mooncake_conversation": "conversation_trace.jsonl",
                  "mooncake_synthetic": "synthetic_trace.jsonl"}

_BESIDE = Path("shared") / "traces" / "mooncake"
_SOURCE_ROOT = Path(__file__).resolve().parents[2]   # the checkout (or site-packages) holding kvtriton/


def default_traces_dir() -> Path:
    """The Mooncake traces folder: ``$KVTRITON_TRACES``, else the first of ``../shared/traces/mooncake``
    (from the working directory) and ``<checkout>/../shared/traces/mooncake`` that exists, else the
    former (so error messages name the usual place)."""
    env = os.environ.get("KVTRITON_TRACES")
    if env:
        return Path(env)
    candidates = [Path("..") / _BESIDE, _SOURCE_ROOT.parent / _BESIDE]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def mooncake_trace_path(name: str, traces_dir=None) -> Path:
    """The file of the Mooncake workload ``name`` (``mooncake_conversation`` / ``mooncake_synthetic``) in
    ``traces_dir`` (default: :func:`default_traces_dir`)."""
    key = str(name).lower().replace("-", "_")
    if key not in MOONCAKE_FILES:
        raise ValueError(f"unknown Mooncake trace {name!r}; valid: {', '.join(sorted(MOONCAKE_FILES))}")
    folder = Path(traces_dir) if traces_dir else default_traces_dir()
    return folder / MOONCAKE_FILES[key]
