"""Compiled replay kernels for the policies with several queues and ghosts: S3-FIFO and ARC.

The trace arrays and ``res``/``pins``/``cnt`` are those of ``lists.py``. A key is in at most one queue at a
time (resident keys in the data queues, evicted ones in the ghost queues); ``where`` (int8) says which
queue holds a key (-1: none). Queues that only lose keys at their front are flat buffers: S3-FIFO's S and
M are rings, and the ghost queues (S3-FIFO's G, ARC's B1 and B2) are lazy queues, where a key that leaves
from the middle leaves a -1 behind (``gpos``: each key's slot), the front skips those, and a full buffer
(longer than twice its most live keys) is compacted. ARC's T1 and T2 are linked queues as in ``lists.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lists import new_lists, new_outputs, pop_front, prefix_hits, push_back, push_front, release_index, unlink

# ------------------------------------------------------------------------------------------- S3-FIFO
# S and M are ring buffers (``sbuf``/``mbuf``, a power-of-two length, ``qe`` int64 [S head, S tail, M head,
# M tail], free-running positions); the ghost queue G is ``gbuf`` with positions ``qe[4]`` (head),
# ``qe[5]`` (tail) and ``qe[6]`` (live entries): a key that leaves G from the middle leaves a -1 behind
# (``gpos``: its slot) and a full buffer is compacted. ``where``: the key's queue, 3 parked, -1 none.
_SMALL, _MAIN, _GHOST, _PARKED = 0, 1, 2, 3


@njit(cache=True, inline="always")
def _ring_pop(buf, qe, q):
    h = qe[2 * q]
    qe[2 * q] = h + 1
    return buf[h & (buf.size - 1)]


@njit(cache=True, inline="always")
def _ring_push(buf, qe, q, k, front):
    if front:
        h = qe[2 * q] - 1
        qe[2 * q] = h
        buf[h & (buf.size - 1)] = k
    else:
        t = qe[2 * q + 1]
        qe[2 * q + 1] = t + 1
        buf[t & (buf.size - 1)] = k


@njit(cache=True)
def _lq_compact(buf, gpos, qe, h):
    """Close the gaps of the lazy queue in ``buf`` whose head and tail are ``qe[h]`` and ``qe[h + 1]``."""
    j = 0
    for i in range(qe[h], qe[h + 1]):
        g = buf[i]
        if g >= 0:
            buf[j] = g
            gpos[g] = j
            j += 1
    qe[h] = 0
    qe[h + 1] = j


@njit(cache=True, inline="always")
def _lq_push(buf, gpos, qe, h, k):
    """Append ``k`` to the lazy queue (``buf`` longer than twice its most live entries)."""
    if qe[h + 1] == buf.size:
        _lq_compact(buf, gpos, qe, h)
    buf[qe[h + 1]] = k
    gpos[k] = qe[h + 1]
    qe[h + 1] += 1


@njit(cache=True, inline="always")
def _lq_pop(buf, qe, h):
    """Take the oldest live key out of the lazy queue."""
    i = qe[h]
    while buf[i] < 0:
        i += 1
    qe[h] = i + 1
    return buf[i]


@njit(cache=True, inline="always")
def _ghost_push(gbuf, gpos, where, qe, k, ghost_limit):
    _lq_push(gbuf, gpos, qe, 4, k)
    qe[6] += 1
    where[k] = _GHOST
    if qe[6] > ghost_limit:
        where[_lq_pop(gbuf, qe, 4)] = -1
        qe[6] -= 1


@njit(cache=True, inline="always")
def _s3fifo_victim(pins, freq, where, parked_from, sbuf, mbuf, gbuf, gpos, qe, target, ghost_limit, threshold):
    """``S3FIFOPolicy.victim``: returns the evicted key (it joins the ghost queue if it left from S)."""
    while True:
        ns = qe[1] - qe[0]
        if ns > 0 and (ns >= target or qe[3] == qe[2]):
            k = _ring_pop(sbuf, qe, _SMALL)
            if pins[k] > 0:
                where[k] = _PARKED
                parked_from[k] = _SMALL
            elif freq[k] >= threshold:
                _ring_push(mbuf, qe, _MAIN, k, False)
                where[k] = _MAIN
            else:
                _ghost_push(gbuf, gpos, where, qe, k, ghost_limit)
                return k
        else:
            k = _ring_pop(mbuf, qe, _MAIN)
            if pins[k] > 0:
                where[k] = _PARKED
                parked_from[k] = _MAIN
            elif freq[k] > 0:
                freq[k] -= 1
                _ring_push(mbuf, qe, _MAIN, k, False)
            else:
                where[k] = -1
                return k


@njit(cache=True, inline="always")
def _s3fifo_request(keys, lo, hi, capacity, reverse, params, res, pins, freq, where, parked_from,
                    sbuf, mbuf, gbuf, gpos, qe, cnt):
    target, ghost_limit, threshold = params[0], params[1], params[2]
    for i in range(lo, hi):
        k = keys[i]
        if res[k]:
            if freq[k] < 3:
                freq[k] += 1
            pins[k] += 1
        else:
            if cnt[0] >= capacity:
                v = _s3fifo_victim(pins, freq, where, parked_from, sbuf, mbuf, gbuf, gpos, qe, target,
                                   ghost_limit, threshold)
                res[v] = 0
                cnt[0] -= 1
                cnt[1] += 1
            freq[k] = 0
            if where[k] == _GHOST:
                gbuf[gpos[k]] = -1
                qe[6] -= 1
                _ring_push(mbuf, qe, _MAIN, k, False)
                where[k] = _MAIN
            else:
                _ring_push(sbuf, qe, _SMALL, k, False)
                where[k] = _SMALL
            res[k] = 1
            pins[k] = 1
            cnt[0] += 1
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        pins[k] -= 1
        if pins[k] == 0 and where[k] == _PARKED:
            q = parked_from[k]
            _ring_push(sbuf if q == _SMALL else mbuf, qe, q, k, True)
            where[k] = q


@njit(cache=True)
def _pow2_at_least(n):
    r = 1
    while r < n:
        r *= 2
    return r


@njit(cache=True)
def s3fifo_replay(keys, offsets, num_keys, capacity, reverse, params):
    """S3-FIFO (``S3FIFOPolicy``); ``params``: int64 ``[small queue target, ghost limit,
    move_to_main_threshold]`` as the policy computes them from its capacity; ``freq`` (int8) 0..3."""
    res = np.zeros(num_keys, np.uint8)
    freq = np.zeros(num_keys, np.int8)
    where = np.full(num_keys, -1, np.int8)
    parked_from = np.zeros(num_keys, np.int8)
    pins = np.zeros(num_keys, np.int32)
    ring = _pow2_at_least(min(capacity, num_keys) + 1)
    sbuf = np.zeros(ring, np.int32)
    mbuf = np.zeros(ring, np.int32)
    gbuf = np.zeros(2 * min(params[1], num_keys) + 2, np.int32)
    gpos = np.zeros(num_keys, np.int32)
    qe = np.zeros(7, np.int64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        _s3fifo_request(keys, lo, hi, capacity, reverse, params, res, pins, freq, where, parked_from,
                        sbuf, mbuf, gbuf, gpos, qe, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident


# ------------------------------------------------------------------------------------------------ ARC
# Queues: 0 T1, 1 T2 (linked), 2 B1, 3 B2 (lazy queues ``gb1``/``gb2``, heads and tails in ``gq``; their
# live sizes in ``sizes``), LRU first; ``where`` 4 marks a pinned key, ``plist`` its list (0 T1, 1 T2).
# ``acc``: int64 [pinned keys, pinned keys of T1]; ``p``: float64 [1], the target size of T1.
_T1, _T2, _B1, _B2, _PINNED = 0, 1, 2, 3, 4


@njit(cache=True, inline="always")
def _arc_victim(where, prv, nxt, ends, sizes, acc, p, gb1, gb2, gpos, gq):
    """``ARCPolicy.victim`` (REPLACE): the LRU key of T1 or T2, which joins B1 or B2."""
    if sizes[_T1] > 0 and (sizes[_T1] + acc[1] > p[0] or sizes[_T2] == 0):
        k = pop_front(prv, nxt, ends, sizes, _T1)
        where[k] = _B1
    else:
        k = pop_front(prv, nxt, ends, sizes, _T2)
        where[k] = _B2
    _lq_push(gb1 if where[k] == _B1 else gb2, gpos, gq, 2 * where[k] - 4, k)
    sizes[where[k]] += 1
    return k


@njit(cache=True, inline="always")
def _arc_admit(k, c, where, prv, nxt, ends, sizes, acc, p, gb1, gb2, gpos, gq):
    """``ARCPolicy._admit``: adapt ``p`` on a ghost hit, trim the ghosts otherwise; return T1 or T2."""
    w = where[k]
    if w == _B1:
        p[0] = min(float(c), p[0] + max(1.0, sizes[_B2] / sizes[_B1]))
        gb1[gpos[k]] = -1
        sizes[_B1] -= 1
        return _T2
    if w == _B2:
        p[0] = max(0.0, p[0] - max(1.0, sizes[_B1] / sizes[_B2]))
        gb2[gpos[k]] = -1
        sizes[_B2] -= 1
        return _T2
    if sizes[_B1] > 0 and sizes[_T1] + acc[1] + sizes[_B1] >= c:
        where[_lq_pop(gb1, gq, 0)] = -1
        sizes[_B1] -= 1
    if sizes[_B2] > 0 and sizes[_T1] + sizes[_T2] + acc[0] + sizes[_B1] + sizes[_B2] >= 2 * c:
        where[_lq_pop(gb2, gq, 2)] = -1
        sizes[_B2] -= 1
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
                 p, gb1, gb2, gpos, gq, cnt):
    for i in range(lo, hi):
        k = keys[i]
        if res[k]:
            _arc_hit(k, pins, where, plist, prv, nxt, ends, sizes, acc)
        else:
            if cnt[0] >= capacity:
                v = _arc_victim(where, prv, nxt, ends, sizes, acc, p, gb1, gb2, gpos, gq)
                res[v] = 0
                cnt[0] -= 1
                cnt[1] += 1
            dest = _arc_admit(k, c, where, prv, nxt, ends, sizes, acc, p, gb1, gb2, gpos, gq)
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
    gb1 = np.empty(2 * num_keys + 2, np.int32)
    gb2 = np.empty(2 * num_keys + 2, np.int32)
    gpos = np.empty(num_keys, np.int32)
    gq = np.zeros(4, np.int64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        _arc_request(keys, lo, hi, capacity, c, reverse, res, pins, where, plist, prv, nxt, ends, sizes, acc,
                     p, gb1, gb2, gpos, gq, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident
