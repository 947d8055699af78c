"""ARC, Adaptive Replacement Cache (Megiddo & Modha, FAST'03)."""

from __future__ import annotations

from collections import OrderedDict

from ._util import already_resident, check_capacity, check_size, empty, not_pinned, not_resident
from .base import EvictionPolicy, Key, register_policy


@register_policy("arc", "adaptive")
class ARCPolicy(EvictionPolicy):
    """ARC, O(1).

    T1 holds keys seen once recently, T2 keys seen at least twice; B1 and B2 remember keys evicted from
    them (ghosts, no data). ``p`` is the target size of T1. A miss that hits a ghost adapts it: in B1,
    ``p += max(1, |B2|/|B1|)``; in B2, ``p -= max(1, |B1|/|B2|)`` (clamped to [0, c]); the key then enters
    T2. ``victim`` is the paper's REPLACE: the LRU key of T1 if ``|T1| > p`` (or T2 has nothing to give),
    else the LRU key of T2, each going to its ghost list. Ghost lists are trimmed on insert so that
    ``|T1|+|B1| <= c`` and ``|T1|+|T2|+|B1|+|B2| <= 2c``.

    Because the caller calls ``victim`` before ``insert``, REPLACE cannot see whether the incoming key is
    a B2 ghost (the paper's ``|T1| = p`` tie case); otherwise the lists move as in the paper.
    ``c`` is ``capacity``, or without it the largest number of resident keys seen so far.
    A pinned key leaves its list and returns to the MRU end of T1 or T2 (T2 if it was hit) on ``unpin``.
    """

    def __init__(self, capacity: int | None = None):
        self._capacity = check_capacity(capacity)
        self._t1: OrderedDict = OrderedDict()  # LRU first; evictable keys only
        self._t2: OrderedDict = OrderedDict()
        self._b1: OrderedDict = OrderedDict()
        self._b2: OrderedDict = OrderedDict()
        self._pinned: dict = {}                # key -> [count, list (1 or 2)]
        self._pinned_t1 = 0                    # pinned keys that belong to T1
        self.p = 0.0
        self._high_water = 0

    @property
    def c(self) -> int:
        if self._capacity is not None:
            return self._capacity
        return max(self._high_water, 1)

    def _admit(self, key):
        t1, t2, pinned = self._t1, self._t2, self._pinned
        if key in t1 or key in t2 or key in pinned:
            raise already_resident(key)
        b1, b2 = self._b1, self._b2
        c = self._capacity
        if c is None:
            n = len(t1) + len(t2) + len(pinned) + 1
            if n > self._high_water:
                self._high_water = n
            c = max(self._high_water, 1)
        if key in b1:
            self.p = min(float(c), self.p + max(1.0, len(b2) / len(b1)))
            del b1[key]
            return 2
        if key in b2:
            self.p = max(0.0, self.p - max(1.0, len(b1) / len(b2)))
            del b2[key]
            return 2
        # Case IV of the paper: keep the directory within c (L1) and 2c (L1 + L2).
        if b1 and len(t1) + self._pinned_t1 + len(b1) >= c:
            b1.popitem(last=False)
        if b2 and len(t1) + len(t2) + len(pinned) + len(b1) + len(b2) >= 2 * c:
            b2.popitem(last=False)
        return 1

    def insert(self, key: Key, size: int = 1) -> None:
        check_size(size)
        if self._admit(key) == 1:
            self._t1[key] = None
        else:
            self._t2[key] = None

    def insert_and_pin(self, key: Key, size: int = 1) -> None:
        where = self._admit(key)
        self._pinned[key] = [1, where]
        if where == 1:
            self._pinned_t1 += 1

    def access(self, key: Key) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)
        else:
            entry = self._pinned.get(key)
            if entry is None:
                raise not_resident(key)
            if entry[1] == 1:
                entry[1] = 2
                self._pinned_t1 -= 1

    def access_and_pin(self, key: Key) -> None:
        entry = self._pinned.get(key)
        if entry is not None:
            entry[0] += 1
            if entry[1] == 1:
                entry[1] = 2
                self._pinned_t1 -= 1
        elif key in self._t1:
            del self._t1[key]
            self._pinned[key] = [1, 2]
        elif key in self._t2:
            del self._t2[key]
            self._pinned[key] = [1, 2]
        else:
            raise not_resident(key)

    def remove(self, key: Key) -> None:
        if key in self._t1:
            del self._t1[key]
        elif key in self._t2:
            del self._t2[key]
        else:
            entry = self._pinned.pop(key, None)
            if entry is None:
                raise not_resident(key)
            if entry[1] == 1:
                self._pinned_t1 -= 1

    def victim(self) -> Key:
        t1, t2 = self._t1, self._t2
        if not t1 and not t2:
            raise empty()
        if t1 and (len(t1) + self._pinned_t1 > self.p or not t2):
            key = t1.popitem(last=False)[0]
            self._b1[key] = None
        else:
            key = t2.popitem(last=False)[0]
            self._b2[key] = None
        return key

    def pin(self, key: Key) -> None:
        entry = self._pinned.get(key)
        if entry is not None:
            entry[0] += 1
        elif key in self._t1:
            del self._t1[key]
            self._pinned[key] = [1, 1]
            self._pinned_t1 += 1
        elif key in self._t2:
            del self._t2[key]
            self._pinned[key] = [1, 2]
        else:
            raise not_resident(key)

    def unpin(self, key: Key) -> None:
        self.unpin_many((key,))

    def unpin_many(self, keys) -> None:
        pinned, t1, t2 = self._pinned, self._t1, self._t2
        for key in keys:
            entry = pinned.get(key)
            if entry is None:
                raise not_pinned(key)
            if entry[0] > 1:
                entry[0] -= 1
            else:
                del pinned[key]
                if entry[1] == 1:
                    self._pinned_t1 -= 1
                    t1[key] = None
                else:
                    t2[key] = None

    def __contains__(self, key: Key) -> bool:
        return key in self._t1 or key in self._t2 or key in self._pinned

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2) + len(self._pinned)

    @property
    def num_evictable(self) -> int:
        return len(self._t1) + len(self._t2)

    def lists(self) -> dict:
        """``{"t1", "t2", "b1", "b2"}``: keys LRU first (pinned keys omitted), for inspection and tests."""
        return {"t1": list(self._t1), "t2": list(self._t2), "b1": list(self._b1), "b2": list(self._b2)}
