"""Blocks held by id, without a cache, for a :class:`~kvtriton.memory.pool.CachePool`: ``allocate_blocks``
hands them out (reference count 1, never moved by shrink or compaction), ``free_blocks`` takes them back."""

from __future__ import annotations

from typing import Iterable

from .checks import check_count, is_int


class RawBlocks:
    """Raw block batches of a pool (mixed into :class:`CachePool`, whose state and free list it uses)."""

    def allocate_blocks(self, n: int) -> list[int]:
        """``n`` blocks held by the caller (by id, reference count 1), without a cache; blocks held this
        way are never moved by shrink. Give them back with :meth:`free_blocks`."""
        n = check_count("n", n, 0)
        with self.lock:
            self._check_open()
            self._make_room(n, 0)
            self._evict_to(n)
            ids = self._pop_free(n)
            ref = self._ref
            for b in ids:
                ref[b] = 1
            self._n_used += n
            self._external.update(ids)
        return ids

    def free_blocks(self, ids: Iterable[int]) -> None:
        """Return blocks from :meth:`allocate_blocks`; unknown or already freed ids raise ValueError and
        free nothing."""
        ids = list(ids)
        for i, b in enumerate(ids):
            if not is_int(b):
                raise ValueError(f"ids[{i}] must be an int (a block id from allocate_blocks), got {b!r}")
        ids = [int(b) for b in ids]
        with self.lock:
            self._check_open()
            ext = self._external
            bad = [b for b in ids if b not in ext]
            if bad or len(set(ids)) != len(ids):
                raise ValueError(f"ids must be distinct blocks held from allocate_blocks; not held: {bad[:8]}")
            ext.difference_update(ids)
            ref = self._ref
            for b in ids:
                ref[b] = 0
            self._free.extend(ids)
            self._n_used -= len(ids)
