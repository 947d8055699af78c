"""Compiled (numba) replay kernels for the classic policies, and the choice between them and Python.

One kernel per policy replays a whole ``FlatTrace`` (see ``flat_trace.py``) over flat arrays and returns,
per request, its prefix hits, the evictions so far and the resident keys after it, exactly as the Python
policies driven by ``PrefixCacheReplay`` would (the Python policies are the reference):

- ``lists.py``: LRU, FIFO, SIEVE (doubly linked lists in index arrays);
- ``multiqueue.py``: S3-FIFO and ARC (ring buffers, lazy ghost queues and linked lists);
- ``heaps.py``: LFU and GDSF (a bucket queue ordered as the Python heap policies order).

numba is imported only when a kernel is about to run, so ``kvtriton`` imports without it.
"""

from __future__ import annotations

import numpy as np

KERNEL_POLICIES = ("lru", "fifo", "sieve", "s3fifo", "arc", "lfu", "gdsf")
ENGINES = ("auto", "python", "compiled")
_UNLIMITED = 2**62
_STATE: dict = {"numba_error": None, "compiled": {}}


def numba_problem():
    """None when numba imports, else why not (remembered)."""
    if _STATE["numba_error"] is None:
        try:
            import numba  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            _STATE["numba_error"] = f"numba is not available ({type(e).__name__}: {e})"
        else:
            _STATE["numba_error"] = ""
    return _STATE["numba_error"] or None


def kernel_args(name: str, policy, capacity):
    """The kernel's extra arguments for ``policy`` (a fresh instance of policy ``name``, built with the
    run's keyword arguments) at replay capacity ``capacity``, or a string saying why it has no kernel."""
    if name not in KERNEL_POLICIES:
        return (f"policy {name!r} has no compiled kernel (policies with one: {', '.join(KERNEL_POLICIES)})")
    expected = _policy_classes()[name]
    if type(policy) is not expected:
        return (f"policy {name!r} is registered as {type(policy).__name__}, not the {expected.__name__} "
                f"the compiled kernel reproduces")
    if name in ("s3fifo", "arc") and capacity is not None and policy._capacity != capacity:
        return (f"{name} built with capacity={policy._capacity!r} while the replay's is {capacity}: "
                f"the compiled kernel takes the replay's capacity")
    if name == "s3fifo":
        if capacity is None:
            return (np.array([1, 1, policy.move_to_main_threshold], np.int64),)
        target = policy._small_target()
        return (np.array([target, policy._ghost_limit(), policy.move_to_main_threshold], np.int64),)
    if name == "arc":
        return (int(capacity or 1),)
    if name == "gdsf" and policy._cost_fn is not None:
        return "gdsf with a cost_fn has no compiled kernel (it calls Python per key)"
    return ()


def _policy_classes():
    from ... import policies as p

    return {"lru": p.LRUPolicy, "fifo": p.FIFOPolicy, "sieve": p.SievePolicy, "s3fifo": p.S3FIFOPolicy,
            "arc": p.ARCPolicy, "lfu": p.LFUPolicy, "gdsf": p.GDSFPolicy}


def _kernel(name):
    if name in ("lru", "fifo", "sieve"):
        from . import lists
        return getattr(lists, f"{name}_replay")
    if name in ("s3fifo", "arc"):
        from . import multiqueue
        return getattr(multiqueue, f"{name}_replay")
    from . import heaps
    return heaps.heap_replay


def _call(name, keys, offsets, num_keys, capacity, reverse, extra):
    cap = _UNLIMITED if capacity is None else int(capacity)
    if name in ("lfu", "gdsf"):
        heap_cap = max(1, min(cap, num_keys))
        return _kernel(name)(keys, offsets, num_keys, cap, reverse, name == "gdsf", heap_cap)
    return _kernel(name)(keys, offsets, num_keys, cap, reverse, *extra)


def ensure_compiled(name: str, extra=()):
    """Compile (or load from numba's cache) the kernel of ``name`` by running it on a tiny trace; None when
    it works, else why not (remembered). Call it before forking workers so that they inherit the code."""
    problem = numba_problem()
    if problem:
        return problem
    done = _STATE["compiled"]
    if name not in done:
        keys = np.array([0, 1, 2, 0, 3, 1], np.int32)
        offsets = np.array([0, 3, 6], np.int64)
        try:
            for reverse in (True, False):
                _call(name, keys, offsets, 4, 3, reverse, extra)
        except Exception as e:  # a numba typing or lowering error
            done[name] = f"the compiled {name} kernel failed to build ({type(e).__name__}: {e})"
        else:
            done[name] = ""
    return done[name] or None


def run_kernel(name: str, trace, capacity, order: str, extra=()):
    """Replay ``trace`` (a ``FlatTrace``) through the kernel of ``name``; ``(hits, evictions, resident)``,
    int64 arrays with one entry per request (evictions cumulative)."""
    keys, num_keys = trace.dense_keys()
    return _call(name, keys, trace.offsets, max(num_keys, 1), capacity, order == "prefix", extra)


__all__ = ["KERNEL_POLICIES", "ENGINES", "numba_problem", "kernel_args", "ensure_compiled", "run_kernel"]
