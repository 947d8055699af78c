"""S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO with 2-bit CLOCK, a ghost FIFO."""

from __future__ import annotations

from collections import OrderedDict

from ..checks import check_int
from ._util import already_resident, check_capacity, check_size, empty, not_pinned, not_resident
from .base import EvictionPolicy, Key, register_policy


@register_policy("s3fifo")
class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO, O(1) amortized.

    - A new key enters the small queue S (target ``small_ratio`` = 10% of the capacity), unless it is in
      the ghost queue G, in which case it enters the main queue M.
    - A hit raises the key's frequency, capped at 3; keys never move on a hit.
    - ``victim`` evicts from S while S holds at least its target (or M is empty), else from M. S's oldest
      key moves to M if it was hit at least ``move_to_main_threshold`` times (1, libCacheSim's default;
      the paper's listing uses 2), else it is evicted and remembered in G. M's oldest key is reinserted at
      M's tail with its frequency minus one while that is positive, else evicted.
    - G holds keys only, at most as many as M's target (90% of the capacity), oldest dropped first.

    The queues' sizes depend on the capacity: pass ``capacity`` (blocks); without it the largest number
    of resident keys seen so far stands in. A pinned key found at a queue's front is parked and returns
    to that front when unpinned, so it keeps its place and frequency.
    """

    def __init__(self, capacity: int | None = None, small_ratio: float = 0.1, move_to_main_threshold: int = 1):
        self._capacity = check_capacity(capacity)
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio!r}")
        check_int("move_to_main_threshold", move_to_main_threshold, 1, 3, allowed="1, 2 or 3")
        self.small_ratio = small_ratio
        self.move_to_main_threshold = move_to_main_threshold
        self._small: OrderedDict = OrderedDict()  # oldest first
        self._main: OrderedDict = OrderedDict()
        self._ghost: OrderedDict = OrderedDict()
        self._freq: dict = {}                     # resident key -> 0..3
        self._pinned: dict = {}
        self._parked: dict = {}                   # key -> the queue it was parked from
        self._high_water = 0
        if capacity is not None:
            self._targets = (self._small_target(), self._ghost_limit())

    def _cap(self):
        if self._capacity is not None:
            return self._capacity
        n = len(self._freq)
        if n > self._high_water:
            self._high_water = n
        return max(self._high_water, 1)

    def _small_target(self):
        return max(1, int(self._cap() * self.small_ratio))

    def _ghost_limit(self):
        return max(1, self._cap() - self._small_target())

    def _add(self, key):
        if key in self._freq:
            raise already_resident(key)
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        if self._capacity is None:
            self._cap()

    def insert_and_pin(self, key: Key, size: int = 1) -> None:
        freq = self._freq
        if key in freq:
            raise already_resident(key)
        freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._pinned[key] = 1
        if self._capacity is None:
            self._cap()

    def insert(self, key: Key, size: int = 1) -> None:
        check_size(size)
        self._add(key)

    def access(self, key: Key) -> None:
        f = self._freq.get(key)
        if f is None:
            raise not_resident(key)
        if f < 3:
            self._freq[key] = f + 1

    def access_and_pin(self, key: Key) -> None:
        f = self._freq.get(key)
        if f is None:
            raise not_resident(key)
        if f < 3:
            self._freq[key] = f + 1
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def remove(self, key: Key) -> None:
        if key not in self._freq:
            raise not_resident(key)
        del self._freq[key]
        self._pinned.pop(key, None)
        if self._parked.pop(key, None) is None:
            if key in self._small:
                del self._small[key]
            else:
                del self._main[key]

    def victim(self) -> Key:
        if len(self._freq) == len(self._pinned):
            raise empty()
        small, main, freq, pinned = self._small, self._main, self._freq, self._pinned
        if self._capacity is not None:
            target, glimit = self._targets
        else:
            target, glimit = self._small_target(), self._ghost_limit()
        threshold = self.move_to_main_threshold
        while True:
            if small and (len(small) >= target or not main):
                key = small.popitem(last=False)[0]
                if key in pinned:
                    self._parked[key] = small
                elif freq[key] >= threshold:
                    main[key] = None
                else:
                    del freq[key]
                    ghost = self._ghost
                    ghost[key] = None
                    if len(ghost) > glimit:
                        ghost.popitem(last=False)
                    return key
            else:
                key = main.popitem(last=False)[0]
                if key in pinned:
                    self._parked[key] = main
                elif freq[key] > 0:
                    freq[key] -= 1
                    main[key] = None
                else:
                    del freq[key]
                    return key

    def pin(self, key: Key) -> None:
        if key not in self._freq:
            raise not_resident(key)
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        self.unpin_many((key,))

    def unpin_many(self, keys) -> None:
        pinned, parked = self._pinned, self._parked
        for key in keys:
            n = pinned.get(key)
            if n == 1:
                del pinned[key]
                if parked:
                    queue = parked.pop(key, None)
                    if queue is not None:
                        queue[key] = None
                        queue.move_to_end(key, last=False)
            elif n is None:
                raise not_pinned(key)
            else:
                pinned[key] = n - 1

    def __contains__(self, key: Key) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    @property
    def num_evictable(self) -> int:
        return len(self._freq) - len(self._pinned)

    def queues(self) -> dict:
        """``{"small": [...], "main": [...], "ghost": [...]}`` oldest first (parked keys omitted)."""
        return {"small": list(self._small), "main": list(self._main), "ghost": list(self._ghost)}

    def frequency(self, key: Key) -> int:
        return self._freq[key]
