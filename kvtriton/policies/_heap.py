"""A min-heap of evictable keys with lazy deletion, shared by the priority-based policies."""

from __future__ import annotations

import heapq

from ._util import already_resident, check_size, empty, not_pinned, not_resident
from .base import EvictionPolicy, Key


class HeapPolicy(EvictionPolicy):
    """Evicts the unpinned key of lowest priority; O(log n).

    Heap entries are ``(priority, stamp, key)``; ``stamp`` grows with every push, so among equal
    priorities the key pushed earliest goes first, and an entry is live only while its stamp is the key's
    current one and the key is unpinned. Pinning leaves the entry in place (it is skipped while the key
    is pinned); ``unpin`` pushes a fresh one. The heap is rebuilt when dead entries outnumber live ones.
    Subclasses set ``self._prio[key]`` in ``_on_insert`` and ``_on_access``.
    """

    def __init__(self):
        self._heap: list = []
        self._stamp: dict = {}   # resident key -> stamp of its live entry
        self._prio: dict = {}    # resident key -> priority
        self._pinned: dict = {}
        self._clock = 0

    # hooks ---------------------------------------------------------------------------------------
    def _on_insert(self, key, size):
        raise NotImplementedError

    def _on_access(self, key):
        raise NotImplementedError

    def _on_evict(self, key, prio):
        pass

    def _on_forget(self, key):
        pass

    def _drop(self, key, prio):
        """``key`` was chosen as a victim with ``prio``; subclasses may fuse the two hooks."""
        self._on_evict(key, prio)
        self._on_forget(key)

    # internals -----------------------------------------------------------------------------------
    def _push(self, key):
        self._clock += 1
        self._stamp[key] = self._clock
        heapq.heappush(self._heap, (self._prio[key], self._clock, key))
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._prio):
            self._rebuild()

    def _rebuild(self):
        stamp, pinned = self._stamp, self._pinned
        self._heap = [e for e in self._heap if stamp.get(e[2]) == e[1] and e[2] not in pinned]
        heapq.heapify(self._heap)

    # interface -----------------------------------------------------------------------------------
    def insert(self, key: Key, size: int = 1) -> None:
        if key in self._prio:
            raise already_resident(key)
        check_size(size)
        self._on_insert(key, size)
        self._push(key)

    def insert_and_pin(self, key: Key, size: int = 1) -> None:
        if key in self._prio:
            raise already_resident(key)
        self._on_insert(key, size)
        self._stamp[key] = 0
        self._pinned[key] = 1

    def access(self, key: Key) -> None:
        if key not in self._prio:
            raise not_resident(key)
        self._on_access(key)
        if key not in self._pinned:
            self._push(key)

    def access_and_pin(self, key: Key) -> None:
        if key not in self._prio:
            raise not_resident(key)
        self._on_access(key)
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def remove(self, key: Key) -> None:
        if key not in self._prio:
            raise not_resident(key)
        del self._prio[key]
        del self._stamp[key]
        self._pinned.pop(key, None)
        self._on_forget(key)

    def victim(self) -> Key:
        heap, stamp, pinned = self._heap, self._stamp, self._pinned
        if len(self._prio) == len(pinned):
            raise empty()
        pop = heapq.heappop
        while True:
            prio, s, key = pop(heap)
            if stamp.get(key) == s and key not in pinned:
                del self._prio[key]
                del stamp[key]
                self._drop(key, prio)
                return key

    def pin(self, key: Key) -> None:
        if key not in self._prio:
            raise not_resident(key)
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        self.unpin_many((key,))

    def unpin_many(self, keys) -> None:
        # The replay's hot path: _push inlined.
        pinned, stamp, prio, heap = self._pinned, self._stamp, self._prio, self._heap
        push = heapq.heappush
        clock = self._clock
        try:
            for key in keys:
                n = pinned.get(key)
                if n == 1:
                    del pinned[key]
                    clock += 1
                    stamp[key] = clock
                    push(heap, (prio[key], clock, key))
                elif n is None:
                    raise not_pinned(key)
                else:
                    pinned[key] = n - 1
        finally:
            self._clock = clock
        if len(heap) > 64 and len(heap) > 2 * len(prio):
            self._rebuild()

    def __contains__(self, key: Key) -> bool:
        return key in self._prio

    def __len__(self) -> int:
        return len(self._prio)

    @property
    def num_evictable(self) -> int:
        return len(self._prio) - len(self._pinned)

    def priority(self, key: Key) -> float:
        """The key's current priority (lowest is evicted first)."""
        return self._prio[key]
