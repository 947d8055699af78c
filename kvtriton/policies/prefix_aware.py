"""PREFIX_AWARE: recency plus remembered reuse, priced when a request releases its blocks; dead tails first."""

from __future__ import annotations

import heapq
from collections import OrderedDict

from ._util import already_resident, check_capacity, empty, not_pinned, not_resident
from ._heap import HeapPolicy
from .base import register_policy

DEAD = float("-inf")


@register_policy("prefix_aware")
class PrefixAwarePolicy(HeapPolicy):
    """A policy for prefix caches of LLM serving; O(log n).

    A block's priority (lowest evicted first) is ``beta * E / C + r``: ``E`` is the number of evictions
    so far and ``C`` the capacity, so ``E / C`` is time counted in cache turnovers, and ``r`` is the
    number of requests that have referenced the block, *including before it was last evicted*: a
    bounded history of ``history`` evicted keys (by default 8 x capacity, at least 131,072) remembers
    their counts. One more reference is worth ``1 / beta`` turnovers of age. What a generic cache does
    not know and this policy uses:

    - the priority is set when the block is *released* (its request completes), not when it is hit;
    - the last block of a request whose prompt does not fill it (``input_length`` not a multiple of
      ``block_tokens``) is evicted before any other: a follow-up turn extends the prompt, which changes
      that block's hash, so it is almost never reused (about 1% on the Mooncake conversation trace,
      against 37% for the other blocks);
    - a block's count survives its eviction: a conversation whose prefix fell out and came back keeps
      the standing of its earlier turns;
    - ties go to the block released first, and the replay releases a request's blocks last-first, so
      among equals a request's tail goes before its head and cached prefixes stay whole.

    The request context comes from ``on_request`` (the replay engines call it); without it no block is
    known dead. ``C`` is ``capacity``, or without it the largest number of resident keys seen so far.
    """

    def __init__(self, capacity: int | None = None, beta: float = 2.0, history: int | None = None):
        self._capacity = check_capacity(capacity)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta must be a positive number, got {beta!r}")
        if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 0):
            raise ValueError("history must be a non-negative int or None (8 x capacity, at least 131072), "
                             f"got {history!r}")
        super().__init__()
        self.beta = float(beta)
        self._history_limit = history
        self._refs: dict = {}
        self._history: OrderedDict = OrderedDict()  # evicted key -> its count, oldest first
        self._evictions = 0
        self._high_water = 0
        self._dead = None

    def _cap(self):
        if self._capacity is not None:
            return self._capacity
        return max(self._high_water, 1)

    def on_request(self, keys, num_hit: int, request=None) -> None:
        self._dead = None
        if request is not None and keys:
            bt = getattr(request, "block_tokens", 512) or 512
            if request.input_length % bt:
                self._dead = keys[-1]

    def _push(self, key):
        if key == self._dead:
            self._prio[key] = DEAD
        else:
            self._prio[key] = self.beta * self._evictions / self._cap() + self._refs[key]
        super()._push(key)

    def unpin_many(self, keys) -> None:
        # The replay's hot path: priorities set and entries pushed inline.
        pinned, stamp, prio, refs, heap = self._pinned, self._stamp, self._prio, self._refs, self._heap
        push = heapq.heappush
        base = self.beta * self._evictions / self._cap()
        dead = self._dead
        clock = self._clock
        try:
            for key in keys:
                n = pinned.get(key)
                if n == 1:
                    del pinned[key]
                    p = DEAD if key == dead else base + refs[key]
                    prio[key] = p
                    clock += 1
                    stamp[key] = clock
                    push(heap, (p, clock, key))
                elif n is None:
                    raise not_pinned(key)
                else:
                    pinned[key] = n - 1
        finally:
            self._clock = clock
        if len(heap) > 64 and len(heap) > 2 * len(prio):
            self._rebuild()

    def insert_and_pin(self, key, size: int = 1) -> None:
        prio = self._prio
        if key in prio:
            raise already_resident(key)
        self._refs[key] = self._history.pop(key, 0) + 1
        prio[key] = 0.0
        self._stamp[key] = 0
        self._pinned[key] = 1
        if self._capacity is None and len(prio) > self._high_water:
            self._high_water = len(prio)

    def access_and_pin(self, key) -> None:
        r = self._refs.get(key)
        if r is None:
            raise not_resident(key)
        self._refs[key] = r + 1
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def _on_insert(self, key, size):
        self._refs[key] = self._history.pop(key, 0) + 1
        self._prio[key] = 0.0
        if self._capacity is None and len(self._prio) > self._high_water:
            self._high_water = len(self._prio)

    def _on_access(self, key):
        self._refs[key] += 1

    def _drop(self, key, prio):
        self._evictions += 1
        hist = self._history
        hist[key] = self._refs.pop(key)
        if len(hist) > self._limit():
            hist.popitem(last=False)

    def _limit(self):
        if self._history_limit is not None:
            return self._history_limit
        return max(8 * self._cap(), 1 << 17)

    def victim(self):
        # HeapPolicy.victim with _drop inlined: the replay calls this once per miss.
        heap, stamp, pinned, prio, refs, hist = (self._heap, self._stamp, self._pinned, self._prio,
                                                 self._refs, self._history)
        if len(prio) == len(pinned):
            raise empty()
        pop = heapq.heappop
        while True:
            _, s, key = pop(heap)
            if stamp.get(key) == s and key not in pinned:
                del prio[key], stamp[key]
                self._evictions += 1
                hist[key] = refs.pop(key)
                if len(hist) > self._limit():
                    hist.popitem(last=False)
                return key

    def _on_forget(self, key):
        del self._refs[key]

    def references(self, key) -> int:
        """Requests that referenced ``key`` (resident or remembered), 0 if unknown."""
        return self._refs.get(key, self._history.get(key, 0))
