"""Compiled replay kernel for the priority policies over ``HeapPolicy``: LFU (LFU-DA) and GDSF.

The Python heap holds entries ``(priority, stamp, key)`` with a stamp that grows with every push, so no
two entries tie and the victim is always the unpinned resident key of least ``(priority, stamp)`` of its
live entry, whatever the heap's shape and however its dead entries are cleaned. With unit sizes and
costs every priority is a whole number (the age starts at 0 and only takes entries' priorities, and an
entry's priority is the age plus a count), so this kernel keeps the same order in a bucket queue:

- one bucket per priority value, a linked list of the keys whose entry has that priority, in stamp order
  (a key's new entry always has the newest stamp, so it goes to the back): ``bhead``/``btail`` (int32,
  a power-of-two ring indexed by the priority modulo its length);
- each key's state is one 32-byte row of ``st`` (int32 ``[key, 8]``): its entry's neighbours in the
  bucket, its pins, its count (0: not resident), and through ``pr = st.view(int64)`` (``[key, 4]``) its
  current priority and its entry's priority (0 when the key has no entry: priorities are at least 1);
- ``bounds``: int64 [a lower bound of the live priorities (the cursor), the highest priority set]; the ring
  is regrown whenever these two span its length, so that all live priorities have distinct buckets;
- an entry carries the priority it was set with. A hit pins the key and changes its current priority
  (``prio``) but leaves the entry, as the Python policy leaves its heap entry; a victim search that meets
  a pinned key first drops its entry (the Python policy pops and skips it); releasing the last pin gives
  the key a new stamp and its current priority (the Python policy pushes a fresh one, the old one dies).

Priorities are whole numbers, kept as int64: these sums give what the policies' float operations give
(below 2**53): LFU ``(age + f) + 1`` on a hit (``f`` the old count), GDSF ``inflation + f / 1`` (``f``
the new count); both ``age + 1`` on insert, and the age (inflation) becomes each victim's priority.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lists import new_outputs, release_index

_EPREV, _ENEXT, _PINS, _FREQ = 0, 1, 2, 3  # int32 fields of a row
_PRIO, _EPR = 2, 3  # int64 fields of a row (``pr``)


@njit(cache=True, inline="always")
def _bq_unlink(bhead, btail, st, pr, k):
    b = pr[k, _EPR] & (bhead.size - 1)
    a = st[k, _EPREV]
    c = st[k, _ENEXT]
    if a >= 0:
        st[a, _ENEXT] = c
    else:
        bhead[b] = c
    if c >= 0:
        st[c, _EPREV] = a
    else:
        btail[b] = a


@njit(cache=True, inline="always")
def _bq_append(bhead, btail, st, pr, k, prio):
    pr[k, _EPR] = prio
    b = prio & (bhead.size - 1)
    t = btail[b]
    st[k, _EPREV] = t
    st[k, _ENEXT] = -1
    if t >= 0:
        st[t, _ENEXT] = k
    else:
        bhead[b] = k
    btail[b] = k


@njit(cache=True)
def _bq_regrow(bhead, btail, st, pr, span):
    """The buckets moved to a ring of at least ``span + 1`` slots, each bucket's order kept."""
    size = bhead.size
    while size <= span:
        size *= 2
    nh = np.full(size, -1, np.int32)
    nt = np.full(size, -1, np.int32)
    for b in range(bhead.size):
        k = bhead[b]
        while k >= 0:
            nxt = st[k, _ENEXT]
            _bq_append(nh, nt, st, pr, k, pr[k, _EPR])
            k = nxt
    return nh, nt


@njit(cache=True, inline="always")
def _set_entry(bhead, btail, st, pr, bounds, k, prio):
    """Give key ``k`` the entry of priority ``prio`` and the newest stamp; return the (maybe regrown)
    bucket arrays."""
    if pr[k, _EPR] > 0:
        _bq_unlink(bhead, btail, st, pr, k)
    if prio < bounds[0]:
        bounds[0] = prio
    if prio > bounds[1]:
        bounds[1] = prio
    if bounds[1] - bounds[0] >= bhead.size:
        bhead, btail = _bq_regrow(bhead, btail, st, pr, bounds[1] - bounds[0])
    _bq_append(bhead, btail, st, pr, k, prio)
    return bhead, btail


@njit(cache=True, inline="always")
def _heap_victim(bhead, btail, st, pr, bounds, age):
    """Drop least entries until an unpinned key comes up; evict it and set the age to its priority."""
    mask = bhead.size - 1
    while True:
        cur = bounds[0]
        while bhead[cur & mask] < 0:
            cur += 1
        bounds[0] = cur
        k = bhead[cur & mask]
        _bq_unlink(bhead, btail, st, pr, k)
        if st[k, _PINS] == 0:
            age[0] = pr[k, _EPR]
            pr[k, _EPR] = 0
            st[k, _FREQ] = 0
            return k
        pr[k, _EPR] = 0


@njit(cache=True, inline="always")
def _heap_request(keys, lo, hi, capacity, reverse, gdsf, st, pr, bhead, btail, bounds, age, cnt, out, r):
    """Replay one request; its prefix hits (the keys before its first miss) go to ``out[r]``."""
    h = hi - lo
    for i in range(lo, hi):
        k = keys[i]
        f = st[k, _FREQ]
        if f > 0:
            st[k, _FREQ] = f + 1
            pr[k, _PRIO] = age[0] + f + 1  # LFU (age + f) + 1, GDSF age + (f + 1)
            st[k, _PINS] += 1
        else:
            if h == hi - lo:
                h = i - lo
            if cnt[0] >= capacity:
                _heap_victim(bhead, btail, st, pr, bounds, age)
                cnt[0] -= 1
                cnt[1] += 1
            st[k, _FREQ] = 1
            pr[k, _PRIO] = age[0] + 1
            st[k, _PINS] = 1
            cnt[0] += 1
    out[r] = h
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        st[k, _PINS] -= 1
        if st[k, _PINS] == 0:
            bhead, btail = _set_entry(bhead, btail, st, pr, bounds, k, pr[k, _PRIO])
    return bhead, btail


@njit(cache=True)
def heap_replay(keys, offsets, num_keys, capacity, reverse, gdsf, heap_capacity):
    """LFU-DA (``gdsf`` False) or GDSF with unit sizes and costs (``gdsf`` True); with unit sizes and
    costs both give a hit the same priority. ``heap_capacity`` (the most keys ever resident) is not
    needed by the bucket queue and kept for the callers. ``bounds``: int64 [a lower bound of the live
    priorities (the cursor), the highest priority set]."""
    st = np.zeros((num_keys, 8), np.int32)
    pr = st.view(np.int64)
    bhead = np.full(64, -1, np.int32)
    btail = np.full(64, -1, np.int32)
    bounds = np.zeros(2, np.int64)
    age = np.zeros(1, np.int64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        bhead, btail = _heap_request(keys, lo, hi, capacity, reverse, gdsf, st, pr, bhead, btail, bounds, age,
                                     cnt, hits, r)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident
