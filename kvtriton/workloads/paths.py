"""Where the public traces are read from: one rule for the library, the harness, the scripts and the tests.

``$KVTRITON_TRACES`` names the Mooncake folder when set. Otherwise the folder is ``shared/traces/mooncake``
beside the project: first relative to the working directory (``../shared/traces/mooncake``, the layout
of a checkout run from its root), then relative to this source tree. The traces are never shipped with
the project.

The agentic coding traces (``claude_code_traces.tgz``) have their own variable, since ``$KVTRITON_TRACES``
names the Mooncake folder: ``$KVTRITON_AGENTIC_TRACES`` names the archive (or a folder holding it, or an
unpacked ``traces/`` folder); otherwise ``shared/traces/weka-agentic`` beside the project, by the same rule.
"""

from __future__ import annotations

import os
from pathlib import Path

MOONCAKE_FILES = {"mooncake_conversation": "conversation_trace.jsonl",
                  "mooncake_synthetic": "synthetic_trace.jsonl"}

_BESIDE = Path("shared") / "traces" / "mooncake"
_AGENTIC_BESIDE = Path("shared") / "traces" / "weka-agentic"
AGENTIC_ARCHIVE = "claude_code_traces.tgz"
_SOURCE_ROOT = Path(__file__).resolve().parents[2]   # the checkout (or site-packages) holding kvtriton/


def _beside(folder: Path) -> Path:
    """``../<folder>`` (from the working directory) or ``<checkout>/../<folder>``, the first that exists,
    else the former."""
    candidates = [Path("..") / folder, _SOURCE_ROOT.parent / folder]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def default_traces_dir() -> Path:
    """The Mooncake traces folder: ``$KVTRITON_TRACES``, else the first of ``../shared/traces/mooncake``
    (from the working directory) and ``<checkout>/../shared/traces/mooncake`` that exists, else the
    former (so error messages name the usual place)."""
    env = os.environ.get("KVTRITON_TRACES")
    if env:
        return Path(env)
    return _beside(_BESIDE)


def mooncake_trace_path(name: str, traces_dir=None) -> Path:
    """The file of the Mooncake workload ``name`` (``mooncake_conversation`` / ``mooncake_synthetic``) in
    ``traces_dir`` (default: :func:`default_traces_dir`)."""
    key = str(name).lower().replace("-", "_")
    if key not in MOONCAKE_FILES:
        raise ValueError(f"unknown Mooncake trace {name!r}; valid: {', '.join(sorted(MOONCAKE_FILES))}")
    folder = Path(traces_dir) if traces_dir else default_traces_dir()
    return folder / MOONCAKE_FILES[key]


def agentic_trace_path(traces_dir=None) -> Path:
    """The agentic traces to read: ``traces_dir`` (default ``$KVTRITON_AGENTIC_TRACES``, else
    ``shared/traces/weka-agentic`` beside the project) when it is the archive or an unpacked folder of
    trace files, else ``<traces_dir>/claude_code_traces.tgz`` (whether or not it exists, so that error
    messages name the usual place)."""
    if traces_dir is None:
        env = os.environ.get("KVTRITON_AGENTIC_TRACES")
        folder = Path(env) if env else _beside(_AGENTIC_BESIDE)
    else:
        folder = Path(traces_dir)
    if folder.is_file():
        return folder
    archive = folder / AGENTIC_ARCHIVE
    if not archive.exists() and ((folder / "traces").is_dir() or any(folder.glob("*.json"))):
        return folder
    return archive
