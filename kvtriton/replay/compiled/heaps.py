"""Compiled replay kernel for the priority policies over ``HeapPolicy``: LFU (LFU-DA) and GDSF.

The Python heap holds entries ``(priority, stamp, key)`` with a stamp that grows with every push, so no
two entries tie and the victim is always the unpinned resident key of least ``(priority, stamp)`` of its
live entry, whatever the heap's shape and however its dead entries are cleaned. This kernel keeps the
same order in an indexed binary min-heap:

- slot arrays ``hkey`` (int32), ``hprio`` (float64), ``hstamp`` (int64) of length ``heap_capacity``, plus
  ``pos`` (int32 per key: the key's slot, -1 when it has no entry) and ``size`` (``hn[0]``);
- an entry carries the priority and stamp it was pushed with. A hit pins the key and changes its current
  priority (``prio``) but leaves the entry, as the Python policy leaves its heap entry; a victim search
  that meets a pinned key at the top drops its entry (the Python policy pops and skips it); releasing
  the last pin gives the key a new stamp and its current priority, in place or as a new entry (the
  Python policy pushes a fresh one and the old one dies).

Priorities are computed in the same float operations as the policies: LFU ``(age + f) + 1`` on a hit
(``f`` the old count), GDSF ``inflation + f / 1`` (``f`` the new count); both ``age + 1`` on insert, and
the age (inflation) becomes each victim's priority.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lists import new_outputs, prefix_hits, release_index


@njit(cache=True, inline="always")
def _place(hkey, hprio, hstamp, pos, i, k, prio, stamp):
    hkey[i] = k
    hprio[i] = prio
    hstamp[i] = stamp
    pos[k] = i


@njit(cache=True, inline="always")
def _sift_up(hkey, hprio, hstamp, pos, i, k, prio, stamp):
    """Put entry ``(prio, stamp)`` of key ``k`` at hole ``i`` or above it; return whether it moved."""
    start = i
    while i > 0:
        parent = (i - 1) >> 1
        pp = hprio[parent]
        if prio < pp or (prio == pp and stamp < hstamp[parent]):
            _place(hkey, hprio, hstamp, pos, i, hkey[parent], pp, hstamp[parent])
            i = parent
        else:
            break
    _place(hkey, hprio, hstamp, pos, i, k, prio, stamp)
    return i != start


@njit(cache=True, inline="always")
def _sift_down(hkey, hprio, hstamp, pos, i, n, k, prio, stamp):
    """Put entry ``(prio, stamp)`` of key ``k`` at hole ``i`` or below it, in a heap of ``n`` slots."""
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        cp, cs = hprio[c], hstamp[c]
        if c + 1 < n:
            rp, rs = hprio[c + 1], hstamp[c + 1]
            if rp < cp or (rp == cp and rs < cs):
                c += 1
                cp, cs = rp, rs
        if cp < prio or (cp == prio and cs < stamp):
            _place(hkey, hprio, hstamp, pos, i, hkey[c], cp, cs)
            i = c
        else:
            break
    _place(hkey, hprio, hstamp, pos, i, k, prio, stamp)


@njit(cache=True, inline="always")
def _pop_top(hkey, hprio, hstamp, pos, hn, top):
    """Remove the least entry; return its key, its priority in ``top[0]``."""
    n = hn[0] - 1
    k = hkey[0]
    top[0] = hprio[0]
    pos[k] = -1
    hn[0] = n
    if n > 0:
        _sift_down(hkey, hprio, hstamp, pos, 0, n, hkey[n], hprio[n], hstamp[n])
    return k


@njit(cache=True, inline="always")
def _set_entry(hkey, hprio, hstamp, pos, hn, k, prio, stamp):
    """Give key ``k`` the entry ``(prio, stamp)``: a new one, or its old one moved into place."""
    i = pos[k]
    if i < 0:
        i = hn[0]
        hn[0] = i + 1
    if not _sift_up(hkey, hprio, hstamp, pos, i, k, prio, stamp):
        _sift_down(hkey, hprio, hstamp, pos, i, hn[0], k, prio, stamp)


@njit(cache=True, inline="always")
def _heap_victim(pins, hkey, hprio, hstamp, pos, hn, age):
    """Pop entries until an unpinned key comes up; evict it and set the age to its entry's priority."""
    while True:
        k = _pop_top(hkey, hprio, hstamp, pos, hn, age)
        if pins[k] == 0:
            return k


@njit(cache=True, inline="always")
def _heap_request(keys, lo, hi, capacity, reverse, gdsf, res, pins, freq, prio, hkey, hprio, hstamp, pos, hn,
                  age, clock, cnt):
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
                v = _heap_victim(pins, hkey, hprio, hstamp, pos, hn, age)
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
            clock[0] += 1
            _set_entry(hkey, hprio, hstamp, pos, hn, k, prio[k], clock[0])


@njit(cache=True)
def heap_replay(keys, offsets, num_keys, capacity, reverse, gdsf, heap_capacity):
    """LFU-DA (``gdsf`` False) or GDSF with unit sizes and costs (``gdsf`` True); ``heap_capacity``: at
    least the most keys ever resident (the cache's capacity, or the number of keys when unlimited)."""
    res = np.zeros(num_keys, np.uint8)
    pins = np.zeros(num_keys, np.int32)
    freq = np.zeros(num_keys, np.int64)
    prio = np.zeros(num_keys, np.float64)
    pos = np.full(num_keys, -1, np.int32)
    hkey = np.zeros(heap_capacity, np.int32)
    hprio = np.zeros(heap_capacity, np.float64)
    hstamp = np.zeros(heap_capacity, np.int64)
    hn = np.zeros(1, np.int64)
    age = np.zeros(1, np.float64)
    clock = np.zeros(1, np.int64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        _heap_request(keys, lo, hi, capacity, reverse, gdsf, res, pins, freq, prio, hkey, hprio, hstamp, pos,
                      hn, age, clock, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident
