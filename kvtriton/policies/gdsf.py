"""SIZE_AWARE_LRU: Greedy-Dual-Size-Frequency (GDSF, Cherkasova 1998)."""

from __future__ import annotations

from ._util import already_resident, check_capacity, check_size, not_resident
from ._heap import HeapPolicy
from .base import register_policy


@register_policy("gdsf", "size_aware_lru")
class GDSFPolicy(HeapPolicy):
    """Greedy-Dual-Size-Frequency; O(log n).

    A key's priority is ``H = L + frequency * cost / size``, set on insert and on every hit; ``L``
    becomes the priority of each victim, so keys not touched for a while fall behind the ones refreshed
    since (the recency of LRU), while large keys go before small ones of the same popularity. ``size``
    comes from ``insert``; ``cost`` (the price of a miss) is ``cost_fn(key, size)``, 1 by default. With
    equal sizes and costs it orders keys like LFU-DA.
    """

    weighs_size = True

    def __init__(self, capacity: int | None = None, cost_fn=None):
        check_capacity(capacity)
        super().__init__()
        self.inflation = 0.0
        self._cost_fn = cost_fn
        self._freq: dict = {}
        self._size: dict = {}

    def _value(self, key):
        size = self._size[key]
        cost = 1.0 if self._cost_fn is None else float(self._cost_fn(key, size))
        return self._freq[key] * cost / size

    def _on_insert(self, key, size):
        self._freq[key] = 1
        self._size[key] = size
        self._prio[key] = self.inflation + self._value(key)

    def _on_access(self, key):
        self._freq[key] += 1
        self._prio[key] = self.inflation + self._value(key)

    def access_and_pin(self, key) -> None:
        f = self._freq.get(key)
        if f is None:
            raise not_resident(key)
        f += 1
        self._freq[key] = f
        if self._cost_fn is None:
            self._prio[key] = self.inflation + f / self._size[key]
        else:
            self._prio[key] = self.inflation + self._value(key)
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def insert_and_pin(self, key, size: int = 1) -> None:
        if key in self._prio:
            raise already_resident(key)
        if size != 1:
            check_size(size)
        self._on_insert(key, size)
        self._stamp[key] = 0
        self._pinned[key] = 1

    def _on_evict(self, key, prio):
        self.inflation = prio

    def _drop(self, key, prio):
        self.inflation = prio
        del self._freq[key]
        del self._size[key]

    def _on_forget(self, key):
        del self._freq[key]
        del self._size[key]

    def frequency(self, key) -> int:
        return self._freq[key]
