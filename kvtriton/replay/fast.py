"""Fast replay of a request trace against one eviction policy: hit rates and miss-ratio curves.

Prefix-cache semantics, no tensors. For each request in order:

1. its hits are the longest prefix of its ``hash_ids`` that is resident;
2. its blocks are referenced in prefix order: a resident block is hit and pinned
   (``access_and_pin``), a missing one is inserted pinned (``insert_and_pin``), after evicting one
   unpinned block with ``policy.victim()`` whenever the cache is full;
3. the request completes at once and its blocks become evictable (``unpin_many``).

``order`` sets the order of step 3. ``"prefix"`` (the default) releases the last block first, as vLLM
frees a finished sequence's blocks in reverse, so that among a request's blocks, which become evictable
together, recency-ordered policies evict the tail before the head and a cached prefix is not cut in the
middle. ``"forward"`` releases them first to last, the literal "touched in order". Because the blocks are
pinned while the request runs and released together, the two differ only at a request's boundary. On
``conversation_trace.jsonl`` (hit rate at 10,000 / 30,000 blocks, ``"prefix"`` then ``"forward"``):

- LRU 0.2116 / 0.3257 and 0.2112 / 0.3257 (the reference points 0.21 / 0.33 hold either way; a plain
  ``OrderedDict`` LRU without pins, touching blocks in order, gives 0.2112 / 0.3257 too);
- ARC 0.2225 / 0.3109 and 0.2221 / 0.3107; Belady 0.3664 (= an unlimited cache) either way.

Because a running request's blocks are pinned, a capacity smaller than the largest request's block
count cannot serve the trace and is refused before any work starts.

Engines. ``engine="python"`` drives the policy objects through ``PrefixCacheReplay``, one Python call per
block reference (the reference, and the only engine for policy instances, policies with an
``on_request`` hook and Belady's). ``engine="compiled"`` runs the policy's numba kernel
(``kvtriton.replay.compiled``: LRU, FIFO, SIEVE, S3-FIFO, ARC, LFU and GDSF, with their constructor
keyword arguments) over the trace as flat arrays, with exactly the same hits, token hits and evictions,
an order of magnitude faster; it raises ValueError when that is not possible. ``engine="auto"`` (the
default) takes the kernel when there is one and numba works, else Python. Every result says which ran
in ``engine``: ``"compiled"``, ``"python"``, or ``"python-fallback"`` (a kernel exists but could not be
used; ``engine_note`` says why).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import time

import numpy as np

from ..checks import check_int
from ..policies import available_policies, canonical_name, make_policy
from ..policies.base import EvictionPolicy as _Base
from ..policies.prefix_replay import RELEASE_ORDERS as ORDERS, PrefixCacheReplay
from . import compiled as _compiled
from .flat_trace import FlatTrace, prepare_trace

ENGINES = _compiled.ENGINES


def _check_capacity(capacity, max_blocks):
    if capacity is None:
        return None
    check_int("capacity_blocks", capacity, allowed="a positive int (or None: unlimited)")
    if capacity < max(1, max_blocks):
        raise ValueError(f"capacity_blocks={capacity} is below the largest request's {max_blocks} blocks; "
                         f"a running request's blocks are pinned, so capacity_blocks must be >= "
                         f"{max(1, max_blocks)}")
    return capacity


def _check_common(order, engine):
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def _make(policy, capacity, trace, policy_kwargs):
    if isinstance(policy, _Base):
        if len(policy):
            raise ValueError("policy must be empty (a fresh instance); it holds "
                             f"{len(policy)} keys")
        return policy
    name = canonical_name(policy)
    kwargs = dict(policy_kwargs or {})
    kwargs.setdefault("capacity", capacity)
    if name == "belady" and "future" not in kwargs:
        kwargs["future"] = list(itertools.chain.from_iterable(r.hash_ids for r in trace.requests))
    return make_policy(name, **kwargs)


def _choose(policy, capacity, policy_kwargs, engine, trace):
    """The engine plan of one run: ``("compiled", kernel args)``, ``("python", None)`` or
    ``("python-fallback", why)``; ValueError when ``engine="compiled"`` cannot be honoured."""
    if engine == "python":
        return ("python", None)
    if isinstance(policy, _Base):
        why, natural = "a policy instance replays in Python (pass its registered name instead)", True
    else:
        name = canonical_name(policy)
        natural = name not in _compiled.KERNEL_POLICIES
        if natural:
            why = _compiled.kernel_args(name, None, capacity)
        else:
            kwargs = dict(policy_kwargs or {})
            kwargs.setdefault("capacity", capacity)
            probe = make_policy(name, **kwargs)  # validates the keyword arguments as the Python path does
            why = _compiled.kernel_args(name, probe, capacity)
            if not isinstance(why, str):
                args = why
                why = _compiled.ensure_compiled(name, args) or _dense_problem(trace)
                if why is None:
                    return ("compiled", args)
    if engine == "compiled":
        raise ValueError(f"engine='compiled' is not possible here: {why}; policies with a compiled kernel: "
                         f"{', '.join(_compiled.KERNEL_POLICIES)}")
    return ("python", None) if natural else ("python-fallback", why)


def _has_hook(pol):
    return type(pol).on_request is not _Base.on_request


def _dense_problem(trace):
    try:
        trace.dense_keys()
    except ValueError as e:
        return str(e)
    return None


def _python_replay(pol, cap, order, trace):
    """Drive ``pol`` through ``PrefixCacheReplay``; per request: prefix hits, evictions so far, resident."""
    want_context = _has_hook(pol)
    cache = PrefixCacheReplay(pol, cap, context=want_context, release=order)
    step, res = cache.step, cache.resident
    hits, evictions, resident = [], [], []
    for r in trace.requests:
        ids = r.hash_ids
        if type(ids) is not tuple:
            ids = tuple(ids)
        hits.append(step(ids, r if want_context else None))
        evictions.append(cache.evictions)
        resident.append(len(res))
    return np.array(hits, np.int64), np.array(evictions, np.int64), np.array(resident, np.int64)


def _summarize(trace: FlatTrace, hits, evictions, resident, cap, sample_every):
    """Totals (plain ints and floats) and the optional series from the per-request arrays."""
    token_hits = np.where(hits == trace.lengths, trace.token_refs, trace.block_tokens * hits)
    h, refs = int(hits.sum()), trace.num_references
    th, tr = int(token_hits.sum()), int(trace.token_refs.sum())
    ev = int(evictions[-1]) if len(evictions) else 0
    hit_rate = h / refs if refs else 0.0
    out = {"capacity_blocks": cap, "hits": h, "references": refs, "hit_rate": hit_rate, "token_hits": th,
           "token_references": tr, "token_hit_rate": th / tr if tr else 0.0, "miss_ratio": 1.0 - hit_rate,
           "evictions": ev, "requests": len(trace)}
    if sample_every:
        ch, ct, ctr = np.cumsum(hits), np.cumsum(token_hits), np.cumsum(trace.token_refs)
        series = []
        for idx in range(sample_every - 1, len(trace), sample_every):
            a, b = int(ch[idx]), int(trace.offsets[idx + 1])
            c, d = int(ct[idx]), int(ctr[idx])
            series.append({"requests": idx + 1, "hit_rate": a / b if b else 0.0,
                           "token_hit_rate": c / d if d else 0.0,
                           "occupancy": int(resident[idx]) / cap if cap else float("nan"),
                           "evictions": int(evictions[idx])})
        out["series"] = series
    return out


def simulate(requests, policy, capacity_blocks, *, order: str = "prefix", sample_every: int | None = None,
             policy_kwargs: dict | None = None, engine: str = "auto", _prepared=None, _plan=None) -> dict:
    """Replay ``requests`` (Request records, or a ``FlatTrace`` from ``prepare_trace`` to reuse across
    runs) through one policy at one capacity.

    ``policy``: a registered name (``available_policies()``) or a fresh ``EvictionPolicy``;
    ``capacity_blocks``: cache size in blocks (None: unlimited); ``order``: ``"prefix"`` or
    ``"forward"`` (see the module docstring); ``sample_every``: add ``"series"``, a list with one dict
    per ``sample_every`` requests (``requests``, ``hit_rate`` and ``token_hit_rate`` so far,
    ``occupancy`` = resident blocks / capacity, ``evictions``); ``policy_kwargs``: the policy's
    constructor arguments; ``engine``: ``"auto"``, ``"python"`` or ``"compiled"`` (module docstring).

    Returns a dict of plain numbers: ``policy``, ``capacity_blocks``, ``hits``, ``references``,
    ``hit_rate`` (hits / references), ``token_hits``, ``token_references``, ``token_hit_rate``,
    ``miss_ratio`` (1 - hit_rate), ``evictions``, ``requests``, ``seconds`` (the replay alone), ``engine``
    and, after a fallback, ``engine_note``.
    """
    _check_common(order, engine)
    check_int("sample_every", sample_every, 1, allow_none=True, allowed="a positive int or None")
    if _prepared is None:
        _prepared = requests if isinstance(requests, FlatTrace) else prepare_trace(requests)
    trace = _prepared
    cap = _check_capacity(capacity_blocks, trace.max_blocks)
    plan = _plan if _plan is not None else _choose(policy, cap, policy_kwargs, engine, trace)
    if plan[0] == "compiled":
        name = canonical_name(policy)
        t0 = time.perf_counter()
        arrays = _compiled.run_kernel(name, trace, cap, order, plan[1])
    else:
        pol = _make(policy, cap, trace, policy_kwargs)
        name = pol.name
        t0 = time.perf_counter()
        arrays = _python_replay(pol, cap, order, trace)
    seconds = time.perf_counter() - t0
    out = {"policy": name, **_summarize(trace, *arrays, cap, sample_every), "seconds": seconds,
           "engine": plan[0]}
    if plan[0] == "python-fallback":
        out["engine_note"] = plan[1]
    if sample_every:
        out["series"] = out.pop("series")
    return out


# Worker state for miss_ratio_curve: set before the pool forks, so the trace is not pickled per job.
_JOB_STATE: dict = {}


def _run_job(job):
    name, cap, order, kwargs, plan = job
    return simulate(None, name, cap, order=order, policy_kwargs=kwargs, _prepared=_JOB_STATE["trace"],
                    _plan=plan)


def _init_worker(state):
    _JOB_STATE.update(state)


# Rough relative cost per reference, to start the slowest jobs first (compiled runs cost a tenth).
_COST = {"belady": 4, "prefix_aware": 12, "kv_hawkeye": 5, "lfu": 3, "gdsf": 3, "arc": 2, "s3fifo": 2, "sieve": 2}


def _job_cost(job):
    return _COST.get(job[0], 1) * job[1] * (0.1 if job[4][0] == "compiled" else 1.0)


def _check_curve_args(policies, capacities, order, engine, workers):
    _check_common(order, engine)
    if policies is None:
        policies = available_policies()
    if isinstance(policies, str):
        policies = [policies]
    names = [canonical_name(p) for p in policies]  # ValueError listing the valid names
    if not names:
        raise ValueError(f"policies is empty; valid policies: {', '.join(available_policies(True))}")
    if isinstance(capacities, int):
        capacities = [capacities]
    capacities = list(capacities)
    if not capacities:
        raise ValueError("capacities is empty: give at least one capacity in blocks")
    check_int("workers", workers, 0, allow_none=True, allowed="a non-negative int or None")
    return list(dict.fromkeys(names)), capacities


def miss_ratio_curve(requests, policies=None, capacities=(1000, 3000, 10000, 20000, 30000, 50000), *,
                     order: str = "prefix", progress: bool = True, workers: int | None = None,
                     policy_kwargs: dict | None = None, engine: str = "auto"):
    """Hit rate of every policy at every capacity, as a pandas DataFrame (one row per pair).

    ``requests``: Request records or a ``FlatTrace``; ``policies``: registered names or aliases (default: all); ``capacities``: positive ints, each at least
    the largest request's block count; ``workers``: processes (None: one per CPU, 0 or 1: in this process);
    ``policy_kwargs``: ``{name: {constructor kwargs}}``; ``engine``: as for ``simulate``. The trace is
    prepared (and the kernels compiled) once here, before the workers fork, which share it. Columns:
    ``policy``, ``capacity_blocks``, ``hit_rate``, ``token_hit_rate``, ``miss_ratio``, ``evictions``,
    ``hits``, ``references``, ``token_hits``, ``token_references``, ``requests``, ``seconds``, ``engine``
    (and ``engine_note`` when a run fell back to Python); rows sorted by policy, capacity.
    """
    names, capacities = _check_curve_args(policies, capacities, order, engine, workers)
    trace = requests if isinstance(requests, FlatTrace) else prepare_trace(requests)
    for c in capacities:
        if c is None:
            raise ValueError("capacities must be positive ints; use simulate(..., None) for an unlimited cache")
        _check_capacity(c, trace.max_blocks)
    kw = {canonical_name(k): v for k, v in (policy_kwargs or {}).items()}
    import pandas as pd

    jobs = [(n, c, order, kw.get(n), _choose(n, c, kw.get(n), engine, trace)) for n in names for c in capacities]
    jobs.sort(key=lambda j: -_job_cost(j))
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(workers, len(jobs)))
    rows = _run_jobs(jobs, workers, {"trace": trace}, _progress(len(jobs), progress))
    df = pd.DataFrame(rows)
    rank = {n: i for i, n in enumerate(names)}
    df["_r"] = df["policy"].map(rank)
    df = df.sort_values(["_r", "capacity_blocks"]).drop(columns="_r").reset_index(drop=True)
    cols = ["policy", "capacity_blocks", "hit_rate", "token_hit_rate", "miss_ratio", "evictions", "hits",
            "references", "token_hits", "token_references", "requests", "seconds", "engine"]
    if "engine_note" in df.columns:
        cols.append("engine_note")
    return df[cols]


def _run_jobs(jobs, workers, state, bar):
    rows = []
    try:
        if workers == 1:
            _JOB_STATE.update(state)
            try:
                for j in jobs:
                    rows.append(_run_job(j))
                    bar.update(1)
            finally:
                _JOB_STATE.clear()
        else:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
                for row in pool.imap_unordered(_run_job, jobs):
                    rows.append(row)
                    bar.update(1)
    finally:
        bar.close()
    return rows


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total, enabled):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="miss-ratio curve", unit="run")
