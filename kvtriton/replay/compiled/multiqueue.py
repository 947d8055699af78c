"""Compiled replay kernels for the policies with several queues and ghosts: S3-FIFO and ARC.

The trace arrays and ``cnt`` are those of ``lists.py``. Each key's state is one row of a 2-D int32 array
``st[key, field]`` (pin count, queue, links or ghost slot), so that a key's step touches one cache line;
whether a key is resident follows from its queue. A key is in at most one queue at a time (resident keys
in the data queues, evicted ones in the ghost queues). Queues that only lose keys at their front are flat
buffers: S3-FIFO's S and M are rings, and the ghost queues (S3-FIFO's G, ARC's B1 and B2) are lazy
queues, where a key that leaves from the middle leaves a -1 behind (each key's slot is in its row), the
front skips those, and a full buffer (longer than twice its most live keys) is compacted. ARC's T1 and T2
are linked queues as in ``lists.py``, threaded through the rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lists import new_outputs, release_index


@njit(cache=True, inline="always")
def _lq_compact(buf, st, gf, qe, h):
    """Close the gaps of the lazy queue in ``buf`` whose head and tail are ``qe[h]`` and ``qe[h + 1]``;
    ``st[key, gf]`` is each key's slot."""
    j = 0
    for i in range(qe[h], qe[h + 1]):
        g = buf[i]
        if g >= 0:
            buf[j] = g
            st[g, gf] = j
            j += 1
    qe[h] = 0
    qe[h + 1] = j


@njit(cache=True, inline="always")
def _lq_push(buf, st, gf, qe, h, k):
    """Append ``k`` to the lazy queue (``buf`` longer than twice its most live entries)."""
    if qe[h + 1] == buf.size:
        _lq_compact(buf, st, gf, qe, h)
        if qe[h + 1] == buf.size:   # the size bound failed: stop rather than write past the buffer
            raise RuntimeError("compiled replay: a ghost queue outgrew its buffer")
    buf[qe[h + 1]] = k
    st[k, gf] = qe[h + 1]
    qe[h + 1] += 1


@njit(cache=True, inline="always")
def _lq_pop(buf, qe, h):
    """Take the oldest live key out of the lazy queue."""
    i = qe[h]
    while buf[i] < 0:
        i += 1
    qe[h] = i + 1
    return buf[i]


@njit(cache=True)
def _pow2_at_least(n):
    r = 1
    while r < n:
        r *= 2
    return r


# ------------------------------------------------------------------------------------------- S3-FIFO
# S and M are ring buffers (``sbuf``/``mbuf``, a power-of-two length, ``qe`` int64 [S head, S tail, M head,
# M tail], free-running positions); the ghost queue G is ``gbuf`` with positions ``qe[4]`` (head),
# ``qe[5]`` (tail) and ``qe[6]`` (live entries). Rows: pins, freq (0..3), queue, ghost slot; the queue is
# S, M, G, parked from S, parked from M, or -1 (none). Resident: S, M or parked.
_PINS, _FREQ, _WHERE, _GPOS = 0, 1, 2, 3
_SMALL, _MAIN, _GHOST, _PARKED_S, _PARKED_M = 0, 1, 2, 3, 4


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


@njit(cache=True, inline="always")
def _ghost_push(gbuf, st, qe, k, ghost_limit):
    _lq_push(gbuf, st, _GPOS, qe, 4, k)
    qe[6] += 1
    st[k, _WHERE] = _GHOST
    if qe[6] > ghost_limit:
        st[_lq_pop(gbuf, qe, 4), _WHERE] = -1
        qe[6] -= 1


@njit(cache=True, inline="always")
def _s3fifo_victim(st, sbuf, mbuf, gbuf, qe, target, ghost_limit, threshold):
    """``S3FIFOPolicy.victim``: returns the evicted key (it joins the ghost queue if it left from S)."""
    while True:
        ns = qe[1] - qe[0]
        if ns > 0 and (ns >= target or qe[3] == qe[2]):
            k = _ring_pop(sbuf, qe, _SMALL)
            if st[k, _PINS] > 0:
                st[k, _WHERE] = _PARKED_S
            elif st[k, _FREQ] >= threshold:
                _ring_push(mbuf, qe, _MAIN, k, False)
                st[k, _WHERE] = _MAIN
            else:
                _ghost_push(gbuf, st, qe, k, ghost_limit)
                return k
        else:
            k = _ring_pop(mbuf, qe, _MAIN)
            if st[k, _PINS] > 0:
                st[k, _WHERE] = _PARKED_M
            elif st[k, _FREQ] > 0:
                st[k, _FREQ] -= 1
                _ring_push(mbuf, qe, _MAIN, k, False)
            else:
                st[k, _WHERE] = -1
                return k


@njit(cache=True, inline="always")
def _s3fifo_request(keys, lo, hi, capacity, reverse, params, st, sbuf, mbuf, gbuf, qe, cnt):
    """Replay one request; returns its prefix hits (the keys before its first miss)."""
    target, ghost_limit, threshold = params[0], params[1], params[2]
    h = hi - lo
    for i in range(lo, hi):
        k = keys[i]
        w = st[k, _WHERE]
        if w >= 0 and w != _GHOST:
            if st[k, _FREQ] < 3:
                st[k, _FREQ] += 1
            st[k, _PINS] += 1
        else:
            if h == hi - lo:
                h = i - lo
            if cnt[0] >= capacity:
                _s3fifo_victim(st, sbuf, mbuf, gbuf, qe, target, ghost_limit, threshold)
                cnt[0] -= 1
                cnt[1] += 1
            st[k, _FREQ] = 0
            if st[k, _WHERE] == _GHOST:
                gbuf[st[k, _GPOS]] = -1
                qe[6] -= 1
                _ring_push(mbuf, qe, _MAIN, k, False)
                st[k, _WHERE] = _MAIN
            else:
                _ring_push(sbuf, qe, _SMALL, k, False)
                st[k, _WHERE] = _SMALL
            st[k, _PINS] = 1
            cnt[0] += 1
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        st[k, _PINS] -= 1
        if st[k, _PINS] == 0 and st[k, _WHERE] >= _PARKED_S:
            q = st[k, _WHERE] - _PARKED_S
            _ring_push(sbuf if q == _SMALL else mbuf, qe, q, k, True)
            st[k, _WHERE] = q
    return h


@njit(cache=True)
def s3fifo_replay(keys, offsets, num_keys, capacity, reverse, params):
    """S3-FIFO (``S3FIFOPolicy``); ``params``: int64 ``[small queue target, ghost limit,
    move_to_main_threshold]`` as the policy computes them from its capacity."""
    st = np.zeros((num_keys, 4), np.int32)
    st[:, _WHERE] = -1
    ring = _pow2_at_least(min(capacity, num_keys) + 1)
    sbuf = np.zeros(ring, np.int32)
    mbuf = np.zeros(ring, np.int32)
    gbuf = np.zeros(2 * min(params[1], num_keys) + 2, np.int32)
    qe = np.zeros(7, np.int64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = _s3fifo_request(keys, lo, hi, capacity, reverse, params, st, sbuf, mbuf, gbuf, qe, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident


# ------------------------------------------------------------------------------------------------ ARC
# Queues: 0 T1, 1 T2 (linked through the rows; ``ends``/``sizes`` as in ``lists.py``), 2 B1, 3 B2 (lazy
# queues ``gb1``/``gb2``, heads and tails in ``gq``; their live sizes in ``sizes``), LRU first. Rows:
# previous key (a ghost's slot), next key, pins, queue; a pinned key is off its list, its queue 4 (T1) or
# 5 (T2). Resident: T1, T2 or pinned. ``acc``: int64 [pinned keys, pinned keys of T1]; ``p``: float64
# [1], the target size of T1.
_PRV, _NXT, _APINS, _AW = 0, 1, 2, 3
_T1, _T2, _B1, _B2, _PIN_T1, _PIN_T2 = 0, 1, 2, 3, 4, 5


@njit(cache=True, inline="always")
def _push_back(st, ends, sizes, q, k):
    last = ends[2 * q + 1]
    st[k, _PRV] = last
    st[k, _NXT] = -1
    if last >= 0:
        st[last, _NXT] = k
    else:
        ends[2 * q] = k
    ends[2 * q + 1] = k
    sizes[q] += 1


@njit(cache=True, inline="always")
def _unlink(st, ends, sizes, q, k):
    a = st[k, _PRV]
    b = st[k, _NXT]
    if a >= 0:
        st[a, _NXT] = b
    else:
        ends[2 * q] = b
    if b >= 0:
        st[b, _PRV] = a
    else:
        ends[2 * q + 1] = a
    sizes[q] -= 1


@njit(cache=True, inline="always")
def _arc_victim(st, ends, sizes, acc, p, gb1, gb2, gq):
    """``ARCPolicy.victim`` (REPLACE): the LRU key of T1 or T2, which joins B1 or B2."""
    if sizes[_T1] > 0 and (sizes[_T1] + acc[1] > p[0] or sizes[_T2] == 0):
        k = ends[2 * _T1]
        _unlink(st, ends, sizes, _T1, k)
        st[k, _AW] = _B1
        _lq_push(gb1, st, _PRV, gq, 0, k)
        sizes[_B1] += 1
    else:
        k = ends[2 * _T2]
        _unlink(st, ends, sizes, _T2, k)
        st[k, _AW] = _B2
        _lq_push(gb2, st, _PRV, gq, 2, k)
        sizes[_B2] += 1


@njit(cache=True, inline="always")
def _arc_admit(k, w, c, st, sizes, acc, p, gb1, gb2, gq):
    """``ARCPolicy._admit`` for key ``k`` in queue ``w``: adapt ``p`` on a ghost hit, trim the ghosts
    otherwise; return T1 or T2."""
    if w == _B1:
        p[0] = min(float(c), p[0] + max(1.0, sizes[_B2] / sizes[_B1]))
        gb1[st[k, _PRV]] = -1
        sizes[_B1] -= 1
        return _T2
    if w == _B2:
        p[0] = max(0.0, p[0] - max(1.0, sizes[_B1] / sizes[_B2]))
        gb2[st[k, _PRV]] = -1
        sizes[_B2] -= 1
        return _T2
    if sizes[_B1] > 0 and sizes[_T1] + acc[1] + sizes[_B1] >= c:
        st[_lq_pop(gb1, gq, 0), _AW] = -1
        sizes[_B1] -= 1
    if sizes[_B2] > 0 and sizes[_T1] + sizes[_T2] + acc[0] + sizes[_B1] + sizes[_B2] >= 2 * c:
        st[_lq_pop(gb2, gq, 2), _AW] = -1
        sizes[_B2] -= 1
    return _T1


@njit(cache=True, inline="always")
def _arc_request(keys, lo, hi, capacity, c, reverse, st, ends, sizes, acc, p, gb1, gb2, gq, cnt):
    """``ARCPolicy.access_and_pin`` / ``insert_and_pin`` / ``unpin_many`` for one request; returns its
    prefix hits (the keys before its first miss)."""
    h = hi - lo
    for i in range(lo, hi):
        k = keys[i]
        w = st[k, _AW]
        if w >= _PIN_T1:  # pinned: a hit moves it to T2's side
            st[k, _APINS] += 1
            if w == _PIN_T1:
                st[k, _AW] = _PIN_T2
                acc[1] -= 1
        elif w == _T1 or w == _T2:
            _unlink(st, ends, sizes, w, k)
            st[k, _AW] = _PIN_T2
            st[k, _APINS] = 1
            acc[0] += 1
        else:
            if h == hi - lo:
                h = i - lo
            if cnt[0] >= capacity:
                _arc_victim(st, ends, sizes, acc, p, gb1, gb2, gq)
                cnt[0] -= 1
                cnt[1] += 1
            dest = _arc_admit(k, st[k, _AW], c, st, sizes, acc, p, gb1, gb2, gq)
            st[k, _AW] = _PIN_T1 + dest
            st[k, _APINS] = 1
            acc[0] += 1
            if dest == _T1:
                acc[1] += 1
            cnt[0] += 1
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        st[k, _APINS] -= 1
        if st[k, _APINS] == 0:
            acc[0] -= 1
            q = st[k, _AW] - _PIN_T1
            if q == _T1:
                acc[1] -= 1
            _push_back(st, ends, sizes, q, k)
            st[k, _AW] = q
    return h


@njit(cache=True)
def arc_replay(keys, offsets, num_keys, capacity, reverse, c):
    """ARC (``ARCPolicy``) with ``c`` = the policy's capacity (any positive value when the cache never
    fills: the ghosts stay empty and ``c`` is never read). B1 holds at most ``c`` keys and all the
    queues together at most ``2 c``, which sizes the ghost buffers."""
    st = np.zeros((num_keys, 4), np.int32)
    st[:, _AW] = -1
    ends = np.full(4, -1, np.int64)
    sizes = np.zeros(4, np.int64)
    acc = np.zeros(2, np.int64)
    p = np.zeros(1, np.float64)
    glen = 2 * min(num_keys, 2 * c + 2) + 4
    gb1 = np.empty(glen, np.int32)
    gb2 = np.empty(glen, np.int32)
    gq = np.zeros(4, np.int64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = _arc_request(keys, lo, hi, capacity, c, reverse, st, ends, sizes, acc, p, gb1, gb2, gq, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident
