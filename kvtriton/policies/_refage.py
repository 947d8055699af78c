"""Reference counts that survive eviction, priced with the cache's age when a request releases its
blocks: the machinery shared by ``prefix_aware`` and ``kv_hawkeye``."""

from __future__ import annotations

import heapq
from collections import OrderedDict

from ._heap import HeapPolicy
from ._util import already_resident, empty, not_pinned, not_resident

DEAD = float("-inf")


class RefAgePolicy(HeapPolicy):
    """A heap policy whose keys carry ``r``, the number of requests that referenced them, remembered for
    a bounded history of evicted keys. A key's priority (lowest evicted first) is set when it is
    released (``unpin``): ``age() + r + bonus[key]``, or -inf for the one key named ``_dead`` (it goes
    before any other).

    Subclasses set ``_capacity`` and ``_fixed_limit`` (the history bound, or 0 for ``_limit()`` each
    time) and define ``_age()``; they may set ``_bonus`` (per-key offsets, dropped with their key) and
    ``_dead``. ``C`` (``_cap()``) is the capacity, or without one the largest number of resident keys
    seen so far.
    """

    _bonus: dict | None = None
    _dead = None

    def __init__(self, history: int | None):
        super().__init__()
        self._history_limit = history
        self._refs: dict = {}
        self._history: OrderedDict = OrderedDict()  # evicted key -> its count, oldest first
        self._evictions = 0
        self._high_water = 0

    # -- shared ------------------------------------------------------------------------------------
    def _cap(self):
        if self._capacity is not None:
            return self._capacity
        return max(self._high_water, 1)

    def _limit(self):
        if self._history_limit is not None:
            return self._history_limit
        return max(8 * self._cap(), 1 << 17)

    def _release_prio(self, key):
        if key == self._dead:
            return DEAD
        bonus = self._bonus
        return self._age() + self._refs[key] + (bonus.get(key, 0.0) if bonus is not None else 0.0)

    def _push(self, key):
        self._prio[key] = self._release_prio(key)
        super()._push(key)

    def unpin_many(self, keys) -> None:
        # The replay's hot path: _push and _release_prio inlined, the age computed once.
        pinned, stamp, prio, heap, refs = self._pinned, self._stamp, self._prio, self._heap, self._refs
        base, bonus, dead = self._age(), self._bonus, self._dead
        push = heapq.heappush
        clock = self._clock
        try:
            for key in keys:
                n = pinned.get(key)
                if n == 1:
                    del pinned[key]
                    if key == dead:
                        p = DEAD
                    elif bonus is None:
                        p = base + refs[key]
                    else:
                        p = base + refs[key] + bonus.get(key, 0.0)
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

    def victim(self):
        # HeapPolicy.victim with the history update inlined: the replay calls this once per miss.
        heap, stamp, pinned, prio, refs, hist = (self._heap, self._stamp, self._pinned, self._prio,
                                                 self._refs, self._history)
        if len(prio) == len(pinned):
            raise empty()
        pop = heapq.heappop
        while True:
            _, s, key = pop(heap)
            if stamp.get(key) == s and key not in pinned:
                del prio[key], stamp[key]
                if self._bonus is not None:
                    self._bonus.pop(key, None)
                self._evictions += 1
                hist[key] = refs.pop(key)
                if len(hist) > (self._fixed_limit or self._limit()):
                    hist.popitem(last=False)
                return key

    def _on_forget(self, key):
        del self._refs[key]
        if self._bonus is not None:
            self._bonus.pop(key, None)

    def references(self, key) -> int:
        """Requests that referenced ``key`` (resident or remembered), 0 if unknown."""
        return self._refs.get(key, self._history.get(key, 0))
