"""SIEVE (Zhang et al., NSDI'24): a FIFO queue, one visited bit per key, and a hand that sweeps it."""

from __future__ import annotations

from ._util import already_resident, check_capacity, check_size, empty, not_pinned, not_resident
from .base import EvictionPolicy, Key, register_policy


@register_policy("sieve")
class SievePolicy(EvictionPolicy):
    """SIEVE, O(1) amortized.

    New keys enter at the head (newest end) of a doubly linked list kept in two dicts. A hit sets the
    key's visited bit. ``victim`` moves the hand from where it stopped towards the head, clearing visited
    bits, and evicts the first unvisited key; the hand then rests on the next newer key, and wraps to the
    tail (oldest end) when it runs off the head. Retained keys never move, which is the difference from
    CLOCK/FIFO-reinsertion. A pinned key is passed over with its bit untouched.
    """

    def __init__(self, capacity: int | None = None):
        check_capacity(capacity)
        self._newer: dict = {}    # key -> next newer key (None at the head)
        self._older: dict = {}    # key -> next older key (None at the tail)
        self._visited: dict = {}  # key -> bool; also the resident set
        self._pinned: dict = {}
        self._head = None         # newest
        self._tail = None         # oldest
        self._hand = None

    def _link(self, key):
        self._visited[key] = False
        self._newer[key] = None
        self._older[key] = self._head
        if self._head is not None:
            self._newer[self._head] = key
        else:
            self._tail = key
        self._head = key

    def _unlink(self, key):
        newer = self._newer.pop(key)
        older = self._older.pop(key)
        del self._visited[key]
        if newer is None:
            self._head = older
        else:
            self._older[newer] = older
        if older is None:
            self._tail = newer
        else:
            self._newer[older] = newer
        if self._hand == key:
            self._hand = newer

    def insert(self, key: Key, size: int = 1) -> None:
        if key in self._visited:
            raise already_resident(key)
        check_size(size)
        self._link(key)

    def insert_and_pin(self, key: Key, size: int = 1) -> None:
        if key in self._visited:
            raise already_resident(key)
        self._link(key)
        self._pinned[key] = 1

    def access(self, key: Key) -> None:
        if key not in self._visited:
            raise not_resident(key)
        self._visited[key] = True

    def access_and_pin(self, key: Key) -> None:
        if key not in self._visited:
            raise not_resident(key)
        self._visited[key] = True
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def remove(self, key: Key) -> None:
        if key not in self._visited:
            raise not_resident(key)
        self._unlink(key)
        self._pinned.pop(key, None)

    def victim(self) -> Key:
        if len(self._visited) == len(self._pinned):
            raise empty()
        visited, pinned, newer = self._visited, self._pinned, self._newer
        key = self._hand if self._hand is not None else self._tail
        while key in pinned or visited[key]:
            if key not in pinned:
                visited[key] = False
            key = newer[key]
            if key is None:
                key = self._tail
        self._hand = newer[key]
        self._unlink(key)
        return key

    def pin(self, key: Key) -> None:
        if key not in self._visited:
            raise not_resident(key)
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        self.unpin_many((key,))

    def unpin_many(self, keys) -> None:
        pinned = self._pinned
        for key in keys:
            n = pinned.get(key)
            if n == 1:
                del pinned[key]
            elif n is None:
                raise not_pinned(key)
            else:
                pinned[key] = n - 1

    def __contains__(self, key: Key) -> bool:
        return key in self._visited

    def __len__(self) -> int:
        return len(self._visited)

    @property
    def num_evictable(self) -> int:
        return len(self._visited) - len(self._pinned)

    def order(self) -> list:
        """Resident keys from the tail (oldest) to the head (newest), for inspection and tests."""
        out, key = [], self._tail
        while key is not None:
            out.append(key)
            key = self._newer[key]
        return out

    @property
    def hand(self):
        """The key the next ``victim`` starts from (None: the tail)."""
        return self._hand
