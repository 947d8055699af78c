"""Compiled replay kernels for the policies with several queues and ghosts: S3-FIFO and ARC.

The trace arrays, ``res``/``pins``/``cnt`` and the linked-queue layout are those of ``lists.py``. A key is
in at most one queue at a time (resident keys in the data queues, evicted ones in the ghost queues), so
one pair of link arrays serves all of them; ``where`` (int8) says which queue holds a key (-1: none).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lists import new_lists, new_outputs, pop_front, prefix_hits, push_back, push_front, release_index, unlink

# ------------------------------------------------------------------------------------------- S3-FIFO
# Queues: 0 small, 1 main, 2 ghost; ``where`` 3 marks a parked key, ``parked_from`` its queue.
_SMALL, _MAIN, _GHOST, _PARKED = 0, 1, 2, 3


@njit(cache=True, inline="always")
def _s3fifo_victim(pins, freq, where, parked_from, prv, nxt, ends, sizes, target, ghost_limit, threshold):
    """``S3FIFOPolicy.victim``: returns the evicted key (it joins the ghost queue if it left from S)."""
    while True:
        if sizes[_SMALL] > 0 and (sizes[_SMALL] >= target or sizes[_MAIN] == 0):
            k = pop_front(prv, nxt, ends, sizes, _SMALL)
            if pins[k] > 0:
                where[k] = _PARKED
                parked_from[k] = _SMALL
            elif freq[k] >= threshold:
                push_back(prv, nxt, ends, sizes, _MAIN, k)
                where[k] = _MAIN
            else:
                push_back(prv, nxt, ends, sizes, _GHOST, k)
                where[k] = _GHOST
                if sizes[_GHOST] > ghost_limit:
                    g = pop_front(prv, nxt, ends, sizes, _GHOST)
                    where[g] = -1
                return k
        else:
            k = pop_front(prv, nxt, ends, sizes, _MAIN)
            if pins[k] > 0:
                where[k] = _PARKED
                parked_from[k] = _MAIN
            elif freq[k] > 0:
                freq[k] -= 1
                push_back(prv, nxt, ends, sizes, _MAIN, k)
            else:
                where[k] = -1
                return k


@njit(cache=True, inline="always")
def _s3fifo_request(keys, lo, hi, capacity, reverse, params, res, pins, freq, where, parked_from,
                    prv, nxt, ends, sizes, cnt):
    target, ghost_limit, threshold = params[0], params[1], params[2]
    for i in range(lo, hi):
        k = keys[i]
        if res[k]:
            if freq[k] < 3:
                freq[k] += 1
            pins[k] += 1
        else:
            if cnt[0] >= capacity:
                v = _s3fifo_victim(pins, freq, where, parked_from, prv, nxt, ends, sizes, target, ghost_limit,
                                   threshold)
                res[v] = 0
                cnt[0] -= 1
                cnt[1] += 1
            freq[k] = 0
            if where[k] == _GHOST:
                unlink(prv, nxt, ends, sizes, _GHOST, k)
                push_back(prv, nxt, ends, sizes, _MAIN, k)
                where[k] = _MAIN
            else:
                push_back(prv, nxt, ends, sizes, _SMALL, k)
                where[k] = _SMALL
            res[k] = 1
            pins[k] = 1
            cnt[0] += 1
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        pins[k] -= 1
        if pins[k] == 0 and where[k] == _PARKED:
            q = parked_from[k]
            push_front(prv, nxt, ends, sizes, q, k)
            where[k] = q


@njit(cache=True)
def s3fifo_replay(keys, offsets, num_keys, capacity, reverse, params):
    """S3-FIFO (``S3FIFOPolicy``); ``params``: int64 ``[small queue target, ghost limit,
    move_to_main_threshold]`` as the policy computes them from its capacity; ``freq`` (int8) 0..3."""
    res = np.zeros(num_keys, np.uint8)
    freq = np.zeros(num_keys, np.int8)
    where = np.full(num_keys, -1, np.int8)
    parked_from = np.zeros(num_keys, np.int8)
    pins = np.zeros(num_keys, np.int32)
    prv, nxt, ends, sizes = new_lists(num_keys, 3)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        _s3fifo_request(keys, lo, hi, capacity, reverse, params, res, pins, freq, where, parked_from,
                        prv, nxt, ends, sizes, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident


# ------------------------------------------------------------------------------------------------ ARC
# Queues: 0 T1, 1 T2, 2 B1, 3 B2 (LRU first); ``where`` 4 marks a pinned key, ``plist`` its list (0 T1,
# 1 T2). ``acc``: int64 [pinned keys, pinned keys of T1]; ``p``: float64 [1], the target size of T1.
_T1, _T2, _B1, _B2, _PINNED = 0, 1, 2, 3, 4


@njit(cache=True, inline="always")
def _arc_victim(where, prv, nxt, ends, sizes, acc, p):
    """``ARCPolicy.victim`` (REPLACE): the LRU key of T1 or T2, which joins B1 or B2."""
    if sizes[_T1] > 0 and (sizes[_T1] + acc[1] > p[0] or sizes[_T2] == 0):
        k = pop_front(prv, nxt, ends, sizes, _T1)
        push_back(prv, nxt, ends, sizes, _B1, k)
        where[k] = _B1
    else:
        k = pop_front(prv, nxt, ends, sizes, _T2)
        push_back(prv, nxt, ends, sizes, _B2, k)
        where[k] = _B2
    return k


@njit(cache=True, inline="always")
def _arc_admit(k, c, where, prv, nxt, ends, sizes, acc, p):
    """``ARCPolicy._admit``: adapt ``p`` on a ghost hit, trim the ghosts otherwise; return T1 or T2."""
    w = where[k]
    if w == _B1:
        p[0] = min(float(c), p[0] + max(1.0, sizes[_B2] / sizes[_B1]))
        unlink(prv, nxt, ends, sizes, _B1, k)
        return _T2
    if w == _B2:
        p[0] = max(0.0, p[0] - max(1.0, sizes[_B1] / sizes[_B2]))
        unlink(prv, nxt, ends, sizes, _B2, k)
        return _T2
    if sizes[_B1] > 0 and sizes[_T1] + acc[1] + sizes[_B1] >= c:
        g = pop_front(prv, nxt, ends, sizes, _B1)
        where[g] = -1
    if sizes[_B2] > 0 and sizes[_T1] + sizes[_T2] + acc[0] + sizes[_B1] + sizes[_B2] >= 2 * c:
        g = pop_front(prv, nxt, ends, sizes, _B2)
        where[g] = -1
    return _T1


@njit(cache=True, inline="always")
def _arc_hit(k, pins, where, plist, prv, nxt, ends, sizes, acc):
    """``ARCPolicy.access_and_pin``: a hit moves the key to T2's side and pins it."""
    if where[k] == _PINNED:
        pins[k] += 1
        if plist[k] == _T1:
            plist[k] = _T2
            acc[1] -= 1
    else:
        unlink(prv, nxt, ends, sizes, where[k], k)
        where[k] = _PINNED
        plist[k] = _T2
        pins[k] = 1
        acc[0] += 1


@njit(cache=True, inline="always")
def _arc_request(keys, lo, hi, capacity, c, reverse, res, pins, where, plist, prv, nxt, ends, sizes, acc,
                 p, cnt):
    for i in range(lo, hi):
        k = keys[i]
        if res[k]:
            _arc_hit(k, pins, where, plist, prv, nxt, ends, sizes, acc)
        else:
            if cnt[0] >= capacity:
                v = _arc_victim(where, prv, nxt, ends, sizes, acc, p)
                res[v] = 0
                cnt[0] -= 1
                cnt[1] += 1
            dest = _arc_admit(k, c, where, prv, nxt, ends, sizes, acc, p)
            where[k] = _PINNED
            plist[k] = dest
            pins[k] = 1
            acc[0] += 1
            if dest == _T1:
                acc[1] += 1
            res[k] = 1
            cnt[0] += 1
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        pins[k] -= 1
        if pins[k] == 0:
            acc[0] -= 1
            q = plist[k]
            if q == _T1:
                acc[1] -= 1
            push_back(prv, nxt, ends, sizes, q, k)
            where[k] = q


@njit(cache=True)
def arc_replay(keys, offsets, num_keys, capacity, reverse, c):
    """ARC (``ARCPolicy``) with ``c`` = the policy's capacity (any positive value when the cache never
    fills: the ghosts stay empty and ``c`` is never read)."""
    res = np.zeros(num_keys, np.uint8)
    where = np.full(num_keys, -1, np.int8)
    plist = np.zeros(num_keys, np.int8)
    pins = np.zeros(num_keys, np.int32)
    prv, nxt, ends, sizes = new_lists(num_keys, 4)
    acc = np.zeros(2, np.int64)
    p = np.zeros(1, np.float64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        _arc_request(keys, lo, hi, capacity, c, reverse, res, pins, where, plist, prv, nxt, ends, sizes, acc,
                     p, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident
