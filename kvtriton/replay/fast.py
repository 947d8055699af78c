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
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence

from ..checks import check_int
from ..policies import available_policies, canonical_name, make_policy
from ..policies.base import EvictionPolicy as _Base
from ..policies.prefix_replay import RELEASE_ORDERS as ORDERS, PrefixCacheReplay


def _prepare(requests):
    """Validate ``requests``; return them as a sequence and ``[(hash_ids, block_tokens, token_refs)]``."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        try:
            requests = list(requests)
        except TypeError:
            raise ValueError("requests must be a sequence of Request records") from None
    if len(requests) == 0:
        raise ValueError("requests is empty: the trace has no requests to replay")
    prepared = []
    for i, r in enumerate(requests):
        try:
            ids = tuple(r.hash_ids)
            length = r.input_length
            bt = getattr(r, "block_tokens", 512)
        except AttributeError:
            raise ValueError(f"requests[{i}] is not a Request record (needs hash_ids and input_length)") from None
        check_int(f"requests[{i}].input_length", length, 0, allowed="a non-negative int")
        check_int(f"requests[{i}].block_tokens", bt, 1, allowed="a positive int")
        n = len(ids)
        last = length - bt * (n - 1) if n else 0
        if n and not 1 <= last <= bt:
            last = bt  # the record's length disagrees with its blocks: count whole blocks
        prepared.append((ids, bt, bt * (n - 1) + last if n else 0))
    return requests, prepared


def _check_capacity(capacity, max_blocks):
    if capacity is None:
        return None
    check_int("capacity_blocks", capacity, allowed="a positive int (or None: unlimited)")
    if capacity < max(1, max_blocks):
        raise ValueError(f"capacity_blocks={capacity} is below the largest request's {max_blocks} blocks; "
                         f"a running request's blocks are pinned, so capacity_blocks must be >= "
                         f"{max(1, max_blocks)}")
    return capacity


def _make(policy, capacity, prepared, policy_kwargs):
    if isinstance(policy, _Base):
        if len(policy):
            raise ValueError("policy must be empty (a fresh instance); it holds "
                             f"{len(policy)} keys")
        return policy
    name = canonical_name(policy)
    kwargs = dict(policy_kwargs or {})
    kwargs.setdefault("capacity", capacity)
    if name == "belady" and "future" not in kwargs:
        future = []
        for ids, _, _ in prepared:
            future.extend(ids)
        kwargs["future"] = future
    return make_policy(name, **kwargs)


def simulate(requests, policy, capacity_blocks, *, order: str = "prefix", sample_every: int | None = None,
             policy_kwargs: dict | None = None, _prepared=None) -> dict:
    """Replay ``requests`` (Request records) through one policy at one capacity.

    ``policy``: a registered name (``available_policies()``) or a fresh ``EvictionPolicy``;
    ``capacity_blocks``: cache size in blocks (None: unlimited); ``order``: ``"prefix"`` or
    ``"forward"`` (see the module docstring); ``sample_every``: add ``"series"``, a list with one dict
    per ``sample_every`` requests (``requests``, ``hit_rate`` and ``token_hit_rate`` so far,
    ``occupancy`` = resident blocks / capacity, ``evictions``).

    Returns a dict of plain numbers: ``policy``, ``capacity_blocks``, ``hits``, ``references``,
    ``hit_rate`` (hits / references), ``token_hits``, ``token_references``, ``token_hit_rate``,
    ``miss_ratio`` (1 - hit_rate), ``evictions``, ``requests``, ``seconds``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    check_int("sample_every", sample_every, 1, allow_none=True, allowed="a positive int or None")
    if _prepared is None:
        requests, prepared = _prepare(requests)
    else:
        prepared = _prepared
    max_blocks = max(len(p[0]) for p in prepared)
    cap = _check_capacity(capacity_blocks, max_blocks)
    pol = _make(policy, cap, prepared, policy_kwargs)
    want_context = type(pol).on_request is not _Base.on_request
    records = requests if want_context else None

    t0 = time.perf_counter()
    cache = PrefixCacheReplay(pol, cap, context=want_context, release=order)
    step, res = cache.step, cache.resident
    hits = refs = tok_hits = tok_refs = 0
    series = [] if sample_every else None
    for idx, (ids, bt, ntok) in enumerate(prepared):
        h = step(ids, records[idx] if want_context else None)
        n = len(ids)
        hits += h
        refs += n
        tok_refs += ntok
        tok_hits += ntok if h == n else bt * h
        if series is not None and (idx + 1) % sample_every == 0:
            series.append({"requests": idx + 1, "hit_rate": hits / refs if refs else 0.0,
                           "token_hit_rate": tok_hits / tok_refs if tok_refs else 0.0,
                           "occupancy": len(res) / cap if cap else float("nan"), "evictions": cache.evictions})
    seconds = time.perf_counter() - t0
    evictions = cache.evictions
    hit_rate = hits / refs if refs else 0.0
    out = {"policy": pol.name, "capacity_blocks": cap, "hits": hits, "references": refs,
           "hit_rate": hit_rate, "token_hits": tok_hits, "token_references": tok_refs,
           "token_hit_rate": tok_hits / tok_refs if tok_refs else 0.0, "miss_ratio": 1.0 - hit_rate,
           "evictions": evictions, "requests": len(prepared), "seconds": seconds}
    if series is not None:
        out["series"] = series
    return out


# Worker state for miss_ratio_curve: set before the pool forks, so the trace is not pickled per job.
_JOB_STATE: dict = {}


def _run_job(job):
    name, cap, order, kwargs = job
    st = _JOB_STATE
    return simulate(st["requests"], name, cap, order=order, policy_kwargs=kwargs, _prepared=st["prepared"])


def _init_worker(state):
    _JOB_STATE.update(state)


# Rough relative cost per reference, to start the slowest jobs first.
_COST = {"belady": 4, "prefix_aware": 12, "kv_hawkeye": 5, "lfu": 3, "gdsf": 3, "arc": 2, "s3fifo": 2, "sieve": 2}


def miss_ratio_curve(requests, policies=None, capacities=(1000, 3000, 10000, 20000, 30000, 50000), *,
                     order: str = "prefix", progress: bool = True, workers: int | None = None,
                     policy_kwargs: dict | None = None):
    """Hit rate of every policy at every capacity, as a pandas DataFrame (one row per pair).

    ``policies``: registered names or aliases (default: all); ``capacities``: positive ints, each at least
    the largest request's block count; ``workers``: processes (None: one per CPU, 0 or 1: in this process);
    ``policy_kwargs``: ``{name: {constructor kwargs}}``. Columns: ``policy``, ``capacity_blocks``,
    ``hit_rate``, ``token_hit_rate``, ``miss_ratio``, ``evictions``, ``hits``, ``references``,
    ``token_hits``, ``token_references``, ``requests``, ``seconds``; rows sorted by policy, capacity.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
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
    requests, prepared = _prepare(requests)
    max_blocks = max(len(p[0]) for p in prepared)
    for c in capacities:
        if c is None:
            raise ValueError("capacities must be positive ints; use simulate(..., None) for an unlimited cache")
        _check_capacity(c, max_blocks)
    check_int("workers", workers, 0, allow_none=True, allowed="a non-negative int or None")
    kw = {canonical_name(k): v for k, v in (policy_kwargs or {}).items()}
    import pandas as pd

    jobs = [(n, c, order, kw.get(n)) for n in dict.fromkeys(names) for c in capacities]
    jobs.sort(key=lambda j: -_COST.get(j[0], 1) * j[1])
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(workers, len(jobs)))
    bar = _progress(len(jobs), progress)
    rows = []
    state = {"requests": requests, "prepared": prepared}
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
    df = pd.DataFrame(rows)
    rank = {n: i for i, n in enumerate(dict.fromkeys(names))}
    df["_r"] = df["policy"].map(rank)
    df = df.sort_values(["_r", "capacity_blocks"]).drop(columns="_r").reset_index(drop=True)
    cols = ["policy", "capacity_blocks", "hit_rate", "token_hit_rate", "miss_ratio", "evictions", "hits",
            "references", "token_hits", "token_references", "requests", "seconds"]
    return df[cols]


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
