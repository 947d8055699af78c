"""LRU: evict the least recently used unpinned key."""

from __future__ import annotations

from collections import OrderedDict

from ._util import already_resident, check_capacity, check_size, empty, not_pinned, not_resident
from .base import EvictionPolicy, Key, register_policy


@register_policy("lru")
class LRUPolicy(EvictionPolicy):
    """Least recently used, O(1) everything.

    Evictable keys live in one ``OrderedDict`` in recency order (least recent first). A pinned key leaves
    it and comes back as the most recent on ``unpin``: a block in use until its sequence releases it was
    last used at release, which is how vLLM's free-block queue orders cached blocks. Pins nest (a count).
    """

    def __init__(self, capacity: int | None = None):
        check_capacity(capacity)
        self._lru: OrderedDict = OrderedDict()
        self._pinned: dict = {}

    def insert(self, key: Key, size: int = 1) -> None:
        if key in self._lru or key in self._pinned:
            raise already_resident(key)
        check_size(size)
        self._lru[key] = None

    def insert_and_pin(self, key: Key, size: int = 1) -> None:
        if key in self._lru or key in self._pinned:
            raise already_resident(key)
        self._pinned[key] = 1

    def access(self, key: Key) -> None:
        if key in self._lru:
            self._lru.move_to_end(key)
        elif key not in self._pinned:
            raise not_resident(key)

    def access_and_pin(self, key: Key) -> None:
        pinned = self._pinned
        n = pinned.get(key)
        if n is not None:
            pinned[key] = n + 1
        else:
            try:
                del self._lru[key]
            except KeyError:
                raise not_resident(key) from None
            pinned[key] = 1

    def remove(self, key: Key) -> None:
        if self._lru.pop(key, _MISSING) is _MISSING and self._pinned.pop(key, _MISSING) is _MISSING:
            raise not_resident(key)

    def victim(self) -> Key:
        if not self._lru:
            raise empty()
        return self._lru.popitem(last=False)[0]

    def pin(self, key: Key) -> None:
        n = self._pinned.get(key)
        if n is not None:
            self._pinned[key] = n + 1
        elif key in self._lru:
            del self._lru[key]
            self._pinned[key] = 1
        else:
            raise not_resident(key)

    def unpin(self, key: Key) -> None:
        self.unpin_many((key,))

    def unpin_many(self, keys) -> None:
        pinned, lru = self._pinned, self._lru
        for key in keys:
            n = pinned.get(key)
            if n == 1:
                del pinned[key]
                lru[key] = None
            elif n is None:
                raise not_pinned(key)
            else:
                pinned[key] = n - 1

    def __contains__(self, key: Key) -> bool:
        return key in self._lru or key in self._pinned

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)


_MISSING = object()
