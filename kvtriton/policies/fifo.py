"""FIFO: evict the unpinned key inserted earliest; hits change nothing."""

from __future__ import annotations

from collections import OrderedDict

from ._util import already_resident, check_capacity, check_size, empty, not_pinned, not_resident
from .base import EvictionPolicy, Key, register_policy


@register_policy("fifo")
class FIFOPolicy(EvictionPolicy):
    """First in, first out, O(1) amortized.

    Keys stay in insertion order whether pinned or not, so pinning keeps a key's place. ``victim`` pops
    from the front; a pinned key found there is *parked* (taken off the queue) and, once unpinned, goes
    back to the front: it is still older than every key in the queue.
    """

    def __init__(self, capacity: int | None = None):
        check_capacity(capacity)
        self._queue: OrderedDict = OrderedDict()  # resident keys not parked, oldest first
        self._pinned: dict = {}                    # key -> pin count
        self._parked: set = set()                  # pinned keys taken off the queue's front

    def insert(self, key: Key, size: int = 1) -> None:
        if key in self._queue or key in self._parked:
            raise already_resident(key)
        check_size(size)
        self._queue[key] = None

    def insert_and_pin(self, key: Key, size: int = 1) -> None:
        if key in self._queue or key in self._parked:
            raise already_resident(key)
        self._queue[key] = None
        self._pinned[key] = 1

    def access(self, key: Key) -> None:
        if key not in self._queue and key not in self._parked:
            raise not_resident(key)

    def remove(self, key: Key) -> None:
        if key in self._queue:
            del self._queue[key]
        elif key in self._parked:
            self._parked.discard(key)
        else:
            raise not_resident(key)
        self._pinned.pop(key, None)

    def victim(self) -> Key:
        if len(self._queue) + len(self._parked) == len(self._pinned):
            raise empty()
        queue, pinned = self._queue, self._pinned
        while True:
            key = queue.popitem(last=False)[0]
            if key not in pinned:
                return key
            self._parked.add(key)

    def pin(self, key: Key) -> None:
        n = self._pinned.get(key)
        if n is not None:
            self._pinned[key] = n + 1
        elif key in self._queue:
            self._pinned[key] = 1
        else:
            raise not_resident(key)

    def unpin(self, key: Key) -> None:
        self.unpin_many((key,))

    def unpin_many(self, keys) -> None:
        pinned, parked, queue = self._pinned, self._parked, self._queue
        for key in keys:
            n = pinned.get(key)
            if n == 1:
                del pinned[key]
                if key in parked:
                    parked.discard(key)
                    queue[key] = None
                    queue.move_to_end(key, last=False)
            elif n is None:
                raise not_pinned(key)
            else:
                pinned[key] = n - 1

    access_and_pin = pin  # a hit does not move a key in FIFO order

    def __contains__(self, key: Key) -> bool:
        return key in self._queue or key in self._parked

    def __len__(self) -> int:
        return len(self._queue) + len(self._parked)

    @property
    def num_evictable(self) -> int:
        return len(self._queue) + len(self._parked) - len(self._pinned)
