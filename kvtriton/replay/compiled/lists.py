"""Compiled replay kernels over linked lists: LRU, FIFO and SIEVE, plus the pieces every kernel shares.

Array layout (all kernels):

- ``keys``: int32 ``[references]``, the trace's block keys remapped to dense ids ``0..num_keys-1``, every
  request's keys one after the other in prefix order; ``offsets``: int64 ``[requests + 1]``, request
  ``r``'s keys are ``keys[offsets[r]:offsets[r + 1]]``.
- ``capacity``: blocks (an int; "unlimited" is passed as a number no trace reaches); ``reverse``: release a
  request's keys last first (the ``"prefix"`` order) or first to last (``"forward"``).
- Policy state is one entry per dense key: ``res`` (uint8, resident), ``pins`` (int32, pin count) and the
  policy's own arrays. Queues are doubly linked lists threaded through ``prv``/``nxt`` (int32, -1 at the
  ends); ``ends[2 * q]`` / ``ends[2 * q + 1]`` are queue ``q``'s front (oldest) and back (newest) and
  ``sizes[q]`` its length, so that one pair of link arrays serves several queues when a key is in at
  most one of them at a time.
- ``cnt``: int64 ``[2]``, resident keys and evictions so far.

Each kernel returns ``(hits, evictions, resident)``, int64 ``[requests]``: request ``r``'s prefix hits,
the evictions so far and the resident keys after it. Every step mirrors the Python policy's
``access_and_pin`` / ``insert_and_pin`` / ``victim`` / ``unpin_many`` exactly, pins included.
"""

from __future__ import annotations

import numpy as np
from numba import njit


# ------------------------------------------------------------------------------------ shared pieces

@njit(cache=True)
def new_lists(num_keys, num_queues):
    """``(prv, nxt, ends, sizes)`` for ``num_queues`` empty queues over ``num_keys`` keys."""
    prv = np.full(num_keys, -1, np.int32)
    nxt = np.full(num_keys, -1, np.int32)
    ends = np.full(2 * num_queues, -1, np.int64)
    sizes = np.zeros(num_queues, np.int64)
    return prv, nxt, ends, sizes


@njit(cache=True, inline="always")
def push_back(prv, nxt, ends, sizes, q, k):
    """Append key ``k`` at the back (newest end) of queue ``q``."""
    last = ends[2 * q + 1]
    prv[k] = last
    nxt[k] = -1
    if last >= 0:
        nxt[last] = k
    else:
        ends[2 * q] = k
    ends[2 * q + 1] = k
    sizes[q] += 1


@njit(cache=True, inline="always")
def push_front(prv, nxt, ends, sizes, q, k):
    """Put key ``k`` at the front (oldest end) of queue ``q``."""
    first = ends[2 * q]
    nxt[k] = first
    prv[k] = -1
    if first >= 0:
        prv[first] = k
    else:
        ends[2 * q + 1] = k
    ends[2 * q] = k
    sizes[q] += 1


@njit(cache=True, inline="always")
def unlink(prv, nxt, ends, sizes, q, k):
    """Take key ``k`` out of queue ``q``."""
    a = prv[k]
    b = nxt[k]
    if a >= 0:
        nxt[a] = b
    else:
        ends[2 * q] = b
    if b >= 0:
        prv[b] = a
    else:
        ends[2 * q + 1] = a
    prv[k] = -1
    nxt[k] = -1
    sizes[q] -= 1


@njit(cache=True, inline="always")
def pop_front(prv, nxt, ends, sizes, q):
    """Take the front (oldest) key out of queue ``q`` and return it."""
    k = ends[2 * q]
    unlink(prv, nxt, ends, sizes, q, k)
    return k


@njit(cache=True, inline="always")
def prefix_hits(keys, lo, hi, res):
    """How many leading keys of ``keys[lo:hi]`` are resident."""
    h = 0
    for i in range(lo, hi):
        if res[keys[i]] == 0:
            break
        h += 1
    return h


@njit(cache=True)
def new_outputs(offsets):
    n = offsets.size - 1
    return np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)


@njit(cache=True, inline="always")
def release_index(lo, hi, j, reverse):
    """The position of a request's ``j``-th released key."""
    return hi - 1 - j if reverse else lo + j


# ------------------------------------------------------------------------------------------------- LRU

@njit(cache=True, inline="always")
def _lru_request(keys, lo, hi, capacity, reverse, res, pins, prv, nxt, ends, sizes, cnt):
    for i in range(lo, hi):
        k = keys[i]
        if res[k]:
            if pins[k] > 0:
                pins[k] += 1
            else:
                unlink(prv, nxt, ends, sizes, 0, k)
                pins[k] = 1
        else:
            if cnt[0] >= capacity:
                v = pop_front(prv, nxt, ends, sizes, 0)
                res[v] = 0
                cnt[0] -= 1
                cnt[1] += 1
            res[k] = 1
            pins[k] = 1
            cnt[0] += 1
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        pins[k] -= 1
        if pins[k] == 0:
            push_back(prv, nxt, ends, sizes, 0, k)


@njit(cache=True)
def lru_replay(keys, offsets, num_keys, capacity, reverse):
    """LRU (``LRUPolicy``): queue 0 holds the unpinned keys, least recent first; a pinned key leaves it
    and returns at the back when its last pin goes."""
    res = np.zeros(num_keys, np.uint8)
    pins = np.zeros(num_keys, np.int32)
    prv, nxt, ends, sizes = new_lists(num_keys, 1)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        _lru_request(keys, lo, hi, capacity, reverse, res, pins, prv, nxt, ends, sizes, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident


# ------------------------------------------------------------------------------------------------ FIFO

@njit(cache=True, inline="always")
def _fifo_request(keys, lo, hi, capacity, reverse, res, pins, parked, prv, nxt, ends, sizes, cnt):
    for i in range(lo, hi):
        k = keys[i]
        if res[k]:
            pins[k] += 1
        else:
            if cnt[0] >= capacity:
                v = -1
                while True:
                    v = pop_front(prv, nxt, ends, sizes, 0)
                    if pins[v] == 0:
                        break
                    parked[v] = 1
                res[v] = 0
                cnt[0] -= 1
                cnt[1] += 1
            push_back(prv, nxt, ends, sizes, 0, k)
            res[k] = 1
            pins[k] = 1
            cnt[0] += 1
    for j in range(hi - lo):
        k = keys[release_index(lo, hi, j, reverse)]
        pins[k] -= 1
        if pins[k] == 0 and parked[k]:
            parked[k] = 0
            push_front(prv, nxt, ends, sizes, 0, k)


@njit(cache=True)
def fifo_replay(keys, offsets, num_keys, capacity, reverse):
    """FIFO (``FIFOPolicy``): queue 0 holds resident keys in insertion order, pinned or not; a pinned key
    met at the front while evicting is parked (``parked``, off the queue) and goes back to the front
    when its last pin goes."""
    res = np.zeros(num_keys, np.uint8)
    parked = np.zeros(num_keys, np.uint8)
    pins = np.zeros(num_keys, np.int32)
    prv, nxt, ends, sizes = new_lists(num_keys, 1)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        _fifo_request(keys, lo, hi, capacity, reverse, res, pins, parked, prv, nxt, ends, sizes, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident


# ----------------------------------------------------------------------------------------------- SIEVE

@njit(cache=True, inline="always")
def _sieve_victim(pins, visited, prv, nxt, ends, sizes, hand):
    """Move the hand from ``hand[0]`` (or the oldest key) towards the newest, clearing visited bits of
    unpinned keys, and unlink the first unpinned unvisited key; the hand rests on the next newer one."""
    k = hand[0] if hand[0] >= 0 else ends[0]
    while pins[k] > 0 or visited[k]:
        if pins[k] == 0:
            visited[k] = 0
        k = nxt[k]
        if k < 0:
            k = ends[0]
    hand[0] = nxt[k]
    unlink(prv, nxt, ends, sizes, 0, k)
    return k


@njit(cache=True, inline="always")
def _sieve_request(keys, lo, hi, capacity, res, pins, visited, prv, nxt, ends, sizes, hand, cnt):
    for i in range(lo, hi):
        k = keys[i]
        if res[k]:
            visited[k] = 1
            pins[k] += 1
        else:
            if cnt[0] >= capacity:
                v = _sieve_victim(pins, visited, prv, nxt, ends, sizes, hand)
                res[v] = 0
                cnt[0] -= 1
                cnt[1] += 1
            push_back(prv, nxt, ends, sizes, 0, k)
            visited[k] = 0
            res[k] = 1
            pins[k] = 1
            cnt[0] += 1
    for i in range(lo, hi):  # releasing only counts pins down: the order does not matter
        pins[keys[i]] -= 1


@njit(cache=True)
def sieve_replay(keys, offsets, num_keys, capacity, reverse):
    """SIEVE (``SievePolicy``): queue 0 runs from the oldest key (front, the policy's tail) to the newest
    (back, its head); ``visited`` holds the bits and ``hand[0]`` the hand (-1: start from the oldest)."""
    res = np.zeros(num_keys, np.uint8)
    visited = np.zeros(num_keys, np.uint8)
    pins = np.zeros(num_keys, np.int32)
    prv, nxt, ends, sizes = new_lists(num_keys, 1)
    hand = np.full(1, -1, np.int64)
    cnt = np.zeros(2, np.int64)
    hits, evictions, resident = new_outputs(offsets)
    for r in range(offsets.size - 1):
        lo, hi = offsets[r], offsets[r + 1]
        hits[r] = prefix_hits(keys, lo, hi, res)
        _sieve_request(keys, lo, hi, capacity, res, pins, visited, prv, nxt, ends, sizes, hand, cnt)
        evictions[r] = cnt[1]
        resident[r] = cnt[0]
    return hits, evictions, resident
