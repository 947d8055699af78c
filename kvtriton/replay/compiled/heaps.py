"""Compiled replay kernel for the priority policies over ``HeapPolicy``: LFU (LFU-DA) and GDSF.

The Python heap holds entries ``(priority, stamp, key)`` with a stamp that grows with every push, so no
two entries tie and the victim is always the unpinned resident key of least ``(priority, stamp)`` of its
live entry, whatever the heap's shape and however its dead entries are cleaned. With unit sizes and
costs every priority is a whole number (the age starts at 0 and only takes entries' priorities, and an
entry's priority is the age plus a count), so this kernel keeps the same order in a bucket queue:

- one bucket per priority value, a linked list of the keys whose entry has that priority, in stamp order
  (a key's new entry always has the newest stamp, so it goes to the back): ``bhead``/``btail`` (int32,
  a power-of-two ring indexed by the priority modulo its length), ``eprev``/``enext`` (int32 per key),
  ``epr`` (float64 per key, the entry's priority, 0 when the key has no entry: priorities are at least 1);
- ``st``: int64 [a lower bound of the live priorities (the cursor), the highest priority set]; the ring
  is regrown whenever these two span its length, so that all live priorities have distinct buckets;
- an entry carries the priority it was set with. A hit pins the key and changes its current priority
  (``prio``) but leaves the entry, as the Python policy leaves its heap entry; a victim search that meets
  a pinned key first drops its entry (the Python policy pops and skips it); releasing the last pin gives
  the key a new stamp and its current priority (the Python policy pushes a fresh one, the old one dies).

Priorities are computed in the same float operations as the policies: LFU ``(age + f) + 1`` on a hit
(``f`` the old count), GDSF ``inflation + f / 1`` (``f`` the new count); both ``age + 1`` on insert, and
the age (inflation) becomes each victim's priority.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lists import new_outputs, prefix_hits, release_index


@njit(cache=True, inline="always")
def _bq_unlink(bhead, btail, eprev, enext, epr, k):
    b = np.int64(epr[k]) & (bhead.size - 1)
    a = eprev[k]
    c = enext[k]
    if a >= 0:
        enext[a] = c
    else:
        bhead[b] = c
    if c >= 0:
        eprev[c] = a
    else:
        btail[b] = a


@njit(cache=True, inline="always")
def _bq_append(bhead, btail, eprev, enext, epr, k, prio):
    epr[k] = prio
    b = np.int64(prio) & (bhead.size - 1)
    t = btail[b]
    eprev[k] = t
    enext[k] = -1
    if t >= 0:
        enext[t] = k
    else:
        bhead[b] = k
    btail[b] = k


@njit(cache=True)
def _bq_regrow(bhead, btail, eprev, enext, epr, span):
    """The buckets moved to a ring of at least ``span + 1`` slots, each bucket's order kept."""
    size = bhead.size
    while size <= span:
        size *= 2
    nh = np.full(size, -1, np.int32)
    nt = np.full(size, -1, np.int32)
    for b in range(bhead.size):
        k = bhead[b]
        while k >= 0:
            nxt = enext[k]
            _bq_append(nh, nt, eprev, enext, epr, k, epr[k])
            k = nxt
    return nh, nt


@njit(cache=True, inline="always")
def _set_entry(bhead, btail, eprev, enext, epr, st, k, prio):
    """Give key ``k`` the entry of priority ``prio`` and the newest stamp; return the (maybe regrown)
    bucket arrays."""
    if epr[k] > 0.0:
        _bq_unlink(bhead, btail, eprev, enext, epr, k)
    p = np.int64(prio)
    if p < st[0]:
        st[0] = p
    if p > st[1]:
        st[1] = p
    if st[1] - st[0] >= bhead.size:
        bhead, btail = _bq_regrow(bhead, btail, eprev, enext, epr, st[1] - st[0])
    _bq_append(bhead, btail, eprev, enext, epr, k, prio)
    return bhead, btail


@njit(cache=True, inline="always")
def _heap_victim(pins, bhead, btail, eprev, enext, epr, st, age):
    """Drop least entries until an unpinned key comes up; evict it and set the age to its priority."""
    mask = bhead.size - 1
    while True:
        cur = st[0]
        while bhead[cur & mask] < 0:
            cur += 1
        st[0] = cur
        k = bhead[cur & mask]
        _bq_unlink(bhead, btail, eprev, enext, epr, k)
        if pins[k] == 0:
            age[0] = epr[k]
            epr[k] = 0.0
            return k
        epr[k] = 0.0


@njit(cache=True, inline="always")
def _heap_request(keys, lo, hi, capacity, reverse, gdsf, res, pins, freq, prio, bhead, btail, eprev, enext,
                  epr, st, age, cnt):
    for i in range(lo, hi):
        k = keys[i]
        if res[k]:
            f = freq[k]
            freq[k] = f + 1
            if gdsf:
                prio[k] = age[0] + float(f + 1)
            else:
                prio[k] = (age[0] + f) + 1.0
            pins[k] += 1
        else:
            if cnt[0] >= capacity:
                v = _heap_victim(pins, bhead, btail, eprev, enext, epr, st, age)
                res[v] = 0
                cnt[0] -= 1
                cnt[1] += 1
            freq[k] = 1
            prio[k] = age[0] + 1.0
            res[k] = 1
            pins[k] = 1
            cnt[0] += 1
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        pins[k] -= 1
        if pins[k] == 0:
            bhead, btail = _set_entry(bhead, btail, eprev, enext, epr, st, k, prio[k])
    return bhead, btail


@njit(cache=True)
def heap_replay(keys, offsets, num_keys, capacity, reverse, gdsf, heap_capacity):
    """LFU-DA (``gdsf`` False) or GDSF with unit sizes and costs (``gdsf`` True); ``heap_capacity`` (the
    most keys ever resident) is not needed by the bucket queue and kept for the callers."""
    res = np.zeros(num_keys, np.uint8)
    pins = np.zeros(num_keys, np.int32)
    freq = np.zeros(num_keys, np.int64)
    prio = np.zeros(num_keys, np.float64)
    eprev = np.full(num_keys, -1, np.int32)
    enext = np.full(num_keys, -1, np.int32)
    epr = np.zeros(num_keys, np.float64)
    bhead = np.full(64, -1, np.int32)
    btail = np.full(64, -1, np.int32)
    st = np.zeros(2, np.int64)
    age = np.zeros(1, np.float64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        bhead, btail = _heap_request(keys, lo, hi, capacity, reverse, gdsf, res, pins, freq, prio, bhead, btail,
                                     eprev, enext, epr, st, age, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident
