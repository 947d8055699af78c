"""LFU with dynamic aging (LFU-DA, Arlitt et al. 2000)."""

from __future__ import annotations

from ._util import already_resident, check_capacity, not_resident
from ._heap import HeapPolicy
from .base import register_policy


@register_policy("lfu")
class LFUPolicy(HeapPolicy):
    """Least frequently used, aged so that old popularity fades; O(log n).

    A key's priority is ``K = L + frequency``, set on insert (frequency 1) and on every hit, where ``L``
    (the cache's age) becomes the priority of each victim. Plain LFU keeps keys that were popular long
    ago forever; with the age, a new key starts level with the keys evicted lately, and an old key's
    count must keep growing to stay. Ties go to the key refreshed earliest.
    """

    def __init__(self, capacity: int | None = None):
        check_capacity(capacity)
        super().__init__()
        self.age = 0.0
        self._freq: dict = {}

    def _on_insert(self, key, size):
        self._freq[key] = 1
        self._prio[key] = self.age + 1

    def _on_access(self, key):
        f = self._freq[key] + 1
        self._freq[key] = f
        self._prio[key] = self.age + f

    def access_and_pin(self, key) -> None:
        f = self._freq.get(key)
        if f is None:
            raise not_resident(key)
        self._freq[key] = f + 1
        self._prio[key] = self.age + f + 1
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def insert_and_pin(self, key, size: int = 1) -> None:
        if key in self._prio:
            raise already_resident(key)
        self._freq[key] = 1
        self._prio[key] = self.age + 1
        self._stamp[key] = 0
        self._pinned[key] = 1

    def _on_evict(self, key, prio):
        self.age = prio

    def _on_forget(self, key):
        del self._freq[key]

    def _drop(self, key, prio):
        self.age = prio
        del self._freq[key]

    def frequency(self, key) -> int:
        return self._freq[key]
