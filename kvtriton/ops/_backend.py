"""Which implementation an op runs: the Triton kernel or the plain-PyTorch reference.

CUDA tensors run the Triton kernels. CPU tensors run the Triton kernels in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported, and the references otherwise, so the library
works everywhere. ``backend("reference" | "triton" | "auto")`` overrides the choice for a block of code.
``KVTRITON_DEBUG=1`` (or ``debug_checks(True)``) turns on index-range checks that need a device sync.
"""

from __future__ import annotations

import contextlib
import os
import threading

try:  # triton is a Linux-only dependency; without it every op runs its reference
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_BACKENDS = ("auto", "triton", "reference")
_state = threading.local()
_DEBUG = os.environ.get("KVTRITON_DEBUG", "0") == "1"


def _forced() -> str:
    return getattr(_state, "backend", "auto")


@contextlib.contextmanager
def backend(name: str):
    """Run ops in this thread with ``name`` in ("auto", "triton", "reference")."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    old = _forced()
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = old


def use_triton(t) -> bool:
    """True when the op on tensor ``t`` should launch its Triton kernel."""
    forced = _forced()
    if forced == "reference":
        return False
    if t.is_cuda:
        if not HAS_TRITON:
            if forced == "triton":
                raise RuntimeError("backend('triton') requested but triton is not installed")
            return False
        return True
    if forced == "triton":
        if not (HAS_TRITON and INTERPRET):
            raise RuntimeError("backend('triton') on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "triton is imported")
        return True
    return HAS_TRITON and INTERPRET and t.device.type == "cpu"


def debug_checks(enabled: bool | None = None) -> bool:
    """Get (or set) whether ops check index ranges that need a device sync."""
    global _DEBUG
    if enabled is not None:
        _DEBUG = bool(enabled)
    return _DEBUG or os.environ.get("KVTRITON_DEBUG", "0") == "1"
