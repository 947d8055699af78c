"""A pool's statistics kept as they change, so that ``CachePool.stats()`` (:class:`PoolStatistics`) costs
the same with 100 or 100,000 live caches: counts are plain integers the pool updates on its paths,
internal fragmentation is
kept from each cache's last block (:class:`TailFill`), request-latency percentiles come from a sorted
window updated only when asked (:class:`LatencyWindow`), and the OpenTelemetry gauges of one collection
share one snapshot (:class:`SharedSnapshot`, :func:`register_pool_metrics`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref

import numpy as np

from ..errors import PoolClosedError
from ..percentiles import sorted_percentiles, summary_key

COUNTER_KEYS = ("requests", "releases", "forks", "hit_blocks", "miss_blocks", "hit_tokens", "evictions",
                "cow_copies", "blocks_moved", "grows", "shrinks", "chunks_claimed", "chunks_returned",
                "exhausted")


def ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


class PoolStatistics:
    """The statistics side of :class:`~kvtriton.memory.pool.CachePool` (mixed into it): every figure is
    a count the pool keeps as it changes, so ``stats()`` costs the same at any number of caches."""

    @property
    def capacity_blocks(self) -> int:
        return self._capacity

    def stats(self) -> dict:
        """Plain numbers: blocks and bytes by state, utilization, fragmentation, hits, evictions, chunks
        held and ``request`` latency percentiles (microseconds). Constant time in the number of caches
        and blocks; the percentiles cost a pass over the latency window only when requests were timed
        since the last call."""
        with self.lock:
            self._check_open()
            out = self._stats_locked()
        out.update(self._latency_stats())  # outside the lock: the latency window has its own
        return out

    def _stats_snapshot(self) -> dict:
        """:meth:`stats` less the latency percentiles (what the OpenTelemetry gauges read)."""
        with self.lock:
            self._check_open()
            return self._stats_locked()

    def _latency_stats(self) -> dict:
        return {f"alloc_latency_{k}": v for k, v in self._lat.percentiles_us().items()}

    def reset_latency(self) -> None:
        self._check_open()
        self._lat.clear()

    def _stats_locked(self) -> dict:
        """:meth:`stats` less the latency percentiles, for a caller holding the pool's lock."""
        cap, used, idle, free = self._capacity, self._n_used, self._n_idle, len(self._free)
        B, bs = self.block_bytes, self.block_size
        held_bytes = self._chunks_held * self.arena.chunk_bytes
        cache_blocks = used - len(self._external)   # blocks of allocate_blocks are in no cache
        c = self._counters
        out = {
            "capacity_blocks": cap, "used_blocks": used, "cached_blocks": idle, "free_blocks": free,
            "capacity_bytes": cap * B, "used_bytes": used * B, "cached_bytes": idle * B, "free_bytes": free * B,
            "block_bytes": B, "block_size": bs,
            "utilization": ratio(used, cap),
            "internal_fragmentation": ratio(self._tails.waste(self._cache_refs, self._live_tokens),
                                            cache_blocks * bs),
            "external_fragmentation": 1.0 - ratio(used * B, held_bytes) if held_bytes else 0.0,
            "chunks_held": self._chunks_held, "held_bytes": held_bytes,
            "live_caches": len(self._caches), "live_tokens": self._live_tokens,
            "prefix_cache_entries": len(self._cached),
            "hit_rate": ratio(c["hit_blocks"], c["hit_blocks"] + c["miss_blocks"]),
        }
        out.update(c)
        return out


class TailFill:
    """Internal fragmentation kept incrementally, from each cache's last block.

    The empty slots of the blocks held by caches are ``W = sum over blocks of (block_size - fill)``,
    a block's fill being the most tokens any cache holding it has in it. Every block before a cache's
    last is full, so ``sum over caches of (block_size * len(blocks) - seq_len)`` counts each cache's
    empty slots once; the two differ only on blocks shared by several caches. A shared block that
    every holder has full counts the same in both (nothing empty). A shared block that is some
    holder's partial last block (a fork's shared tail, or a hashed partial block shared through the
    prefix cache) needs a correction ``adj``, so::

        W = block_size * refs - tokens + adj

    with ``refs`` the table entries of all caches and ``tokens`` their lengths, two integers the pool
    keeps on every path (request, append, fork and release each add one number). This object keeps
    ``adj`` and what it needs, all off the hot paths:

    - ``shared``: block -> the caches holding it as their partial last block, for blocks with two or
      more holders (their fills cannot change: a shared block is copied before it is written);
    - ``alone``: hashed block -> the cache that holds it alone as its partial last block (the fill is
      read from the cache when needed; entries are checked when read, so stale ones are harmless),
      which a prefix-cache hit on that block must know about;
    - ``mixed``: the number of ``shared`` blocks that some other holder has full.

    The pool calls :meth:`fork`, :meth:`hits`, :meth:`new_tail`, :meth:`leave` (a copy-on-write) and
    :meth:`release` (only while ``shared`` or ``alone`` has entries: otherwise the cache shares no
    partial block), with reference counts that do not yet count the change (:meth:`hits`: already do).
    While ``mixed`` is 0, no block a cache holds full is in ``shared``, so a release looks at the last
    block only.
    """

    __slots__ = ("block_size", "shared", "alone", "adj", "mixed")

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.shared: dict[int, list] = {}
        self.alone: dict[int, object] = {}
        self.adj = 0
        self.mixed = 0

    def waste(self, refs: int, tokens: int) -> int:
        return self.block_size * refs - tokens + self.adj

    def _adj(self, holders: list, r: int) -> int:
        """``adj`` of a block with ``r`` holders, ``holders`` of them with it as partial last block."""
        bs = self.block_size
        fills = [c._seq_len % bs for c in holders]
        if r > len(fills):  # full in some holder: the partial ones are all empty slots saved
            return -sum(bs - f for f in fills)
        return sum(fills) - max(fills) - (r - 1) * bs

    def _set(self, b: int, holders: list, r_old: int, r_new: int, hashed: bool) -> None:
        """Block ``b``'s partial holders are now ``holders`` (the list in ``shared``, edited in place, or
        a new one) and its holder count ``r_new`` (was ``r_old``)."""
        old = self.shared.get(b)
        if old is not None:
            self.adj -= self._adj(old, r_old)
            self.mixed -= r_old > len(old)
        if r_new >= 2 and holders:
            self.shared[b] = holders
            self.adj += self._adj(holders, r_new)
            self.mixed += r_new > len(holders)
            self.alone.pop(b, None)
            return
        self.shared.pop(b, None)
        if r_new == 1 and holders and hashed:
            self.alone[b] = holders[0]

    def _partial_holders(self, b: int, r: int) -> list:
        """The caches holding ``b`` (``r`` holders) as their partial last block."""
        got = self.shared.get(b)
        if got is not None:
            return got
        if r == 1:
            c = self.alone.get(b)
            if c is not None and not c._released and c._blocks and c._blocks[-1] == b \
                    and c._seq_len % self.block_size:
                return [c]
        return []

    def fork(self, ref: list[int], parent, child, b: int) -> None:
        """``child`` shares every block of ``parent``, whose last block ``b`` is partial (blocks held full
        gain a full holder: nothing changes for them)."""
        holders = self.shared.get(b)
        if holders is None:  # the parent held it alone: now two holders with the same fill
            self.alone.pop(b, None)
            self.shared[b] = [parent, child]
            self.adj += parent._seq_len % self.block_size - self.block_size
            return
        r = ref[b]
        self._set(b, holders + [child], r, r + 1, True)

    def hits(self, ref: list[int], cache, hits: list[int], tail_hit: bool) -> None:
        """``cache`` holds prefix-cache ``hits`` (hashed; ``ref`` counts it already), the last of them as
        its partial last block when ``tail_hit``."""
        last = len(hits) - 1
        for i, b in enumerate(hits):
            r = ref[b] - 1
            holders = self._partial_holders(b, r) if r else []
            if tail_hit and i == last:
                holders = holders + [cache]
            elif not holders:
                continue
            self._set(b, list(holders), r, r + 1, True)

    def new_tail(self, cache, b: int, hashed: bool) -> None:
        """A fresh block ``b`` became the partial last block of ``cache``, its only holder."""
        if hashed:
            self.alone[b] = cache

    def leave(self, ref: list[int], hashes: list, cache, b: int) -> None:
        """``cache``, holding ``b`` as its partial last block, lets go of it (release, copy-on-write)."""
        r = ref[b]
        if r == 1:
            if self.alone.get(b) is cache:
                del self.alone[b]
            return
        holders = self.shared[b]
        if r == 2 and len(holders) == 2:  # a pair of partial holders (a fork): the other stays alone
            other = holders[1] if holders[0] is cache else holders[0]
            bs = self.block_size
            self.adj -= min(cache._seq_len % bs, other._seq_len % bs) - bs
            del self.shared[b]
            if hashes[b] is not None:
                self.alone[b] = other
            return
        self._set(b, [c for c in holders if c is not cache], r, r - 1, hashes[b] is not None)

    def release(self, ref: list[int], hashes: list, cache) -> None:
        """``cache`` lets go of all its blocks."""
        blocks, f = cache._blocks, cache._seq_len % self.block_size
        if f:
            self.leave(ref, hashes, cache, blocks[-1])
        if self.mixed:  # else no block held full by a cache is anyone's shared partial block
            self._leave_full(ref, hashes, blocks[:-1] if f else blocks)

    def _leave_full(self, ref: list[int], hashes: list, blocks) -> None:
        """A cache holding ``blocks`` full lets go of them."""
        shared = self.shared
        for b in blocks:
            holders = shared.get(b)
            if holders is not None:
                r = ref[b]
                self._set(b, list(holders), r, r - 1, hashes[b] is not None)

    def remap(self, mapping: dict[int, int]) -> None:
        """Blocks moved (``src -> dst``), their holders with them."""
        for d in (self.shared, self.alone):
            moved = [(s, d.pop(s)) for s in mapping if s in d]
            for s, v in moved:
                d[mapping[s]] = v

    def clear(self) -> None:
        self.shared.clear()
        self.alone.clear()
        self.adj = self.mixed = 0

    def check(self, caches, ref: list[int], hashes: list) -> None:
        """Compare with a recomputation from ``caches`` (AssertionError): for ``CachePool.validate``."""
        bs = self.block_size
        partial: dict[int, list] = {}
        for c in caches:
            if c._seq_len % bs:
                partial.setdefault(c._blocks[-1], []).append(c)
        shared = {b: hs for b, hs in partial.items() if ref[b] >= 2}
        assert {b: {id(c) for c in hs} for b, hs in self.shared.items()} == \
            {b: {id(c) for c in hs} for b, hs in shared.items()}, "shared partial blocks"
        for b, hs in partial.items():
            if ref[b] == 1 and hashes[b] is not None:
                assert self._partial_holders(b, 1) == hs, f"hashed partial block {b} held alone"
        assert self.adj == sum(self._adj(hs, ref[b]) for b, hs in shared.items()), "adj"
        assert self.mixed == sum(ref[b] > len(hs) for b, hs in shared.items()), "mixed"


class LatencyWindow:
    """The last ``window`` request latencies (nanoseconds); percentiles in microseconds when asked.

    ``add`` is one C call (a bounded deque's append: thread-safe, nothing else on the hot path). When
    percentiles are asked for, the samples that arrived since the last time are drained into a copy of
    the window kept sorted (the samples that fell out of the window removed, the new ones inserted:
    two memory moves of the window and a sort of the new samples), and the percentiles read off it at
    their ranks (:func:`kvtriton.percentiles.sorted_percentiles`); a window that did not change answers from the last result. The values equal
    ``np.percentile`` of the window (linear interpolation) and its mean.
    """

    def __init__(self, window: int = 100_000):
        self.window = int(window)
        self._inbox: collections.deque = collections.deque(maxlen=self.window)
        self.add = self._inbox.append
        self._lock = threading.Lock()
        self._ring = np.zeros(self.window, dtype=np.int64)   # the window in arrival order, circular
        self._head = 0                                       # its oldest sample
        self._n = 0
        self._sum = 0
        self._sorted = np.zeros(0, dtype=np.int64)
        self._last: dict | None = None

    @property
    def count(self) -> int:
        with self._lock:
            self._drain()
            return self._n

    def _drain(self) -> bool:
        """Move the inbox into the window; True when it changed."""
        k = len(self._inbox)
        if not k:
            return False
        pop = self._inbox.popleft   # one at a time: appends racing with the drain are kept for next time
        new = np.fromiter(itertools.starmap(pop, itertools.repeat((), k)), dtype=np.int64, count=k)
        w = self.window
        if k >= w or k > self._n:
            self._rebuild(new)
            return True
        out = self._n + k - w
        if out > 0:
            gone = self._ring[(self._head + np.arange(out)) % w]
            self._head = (self._head + out) % w
            self._n -= out
            self._sum -= int(gone.sum())
            self._sorted = _remove_sorted(self._sorted, np.sort(gone))
        self._ring[(self._head + self._n + np.arange(k)) % w] = new
        self._n += k
        self._sum += int(new.sum())
        s = np.sort(new)
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, s), s)
        return True

    def _rebuild(self, new: np.ndarray) -> None:
        w = self.window
        if self._n:
            old = np.roll(self._ring, -self._head)[: self._n]
            new = np.concatenate((old, new))
        new = new[-w:]
        self._n = new.size
        self._ring[: self._n] = new
        self._head = 0
        self._sum = int(new.sum())
        self._sorted = np.sort(new)

    def percentiles_us(self, qs=(50, 95, 99)) -> dict[str, float]:
        with self._lock:
            changed = self._drain()
            qs = tuple(qs)
            if not changed and self._last is not None and self._last[0] == qs:
                return dict(self._last[1])
            pcts = sorted_percentiles(self._sorted, qs, divisor=1e3) if self._n else [0.0] * len(qs)
            out = {summary_key(f"p{q}", unit="us"): v for q, v in zip(qs, pcts)}
            out[summary_key("mean", unit="us")] = self._sum / self._n / 1e3 if self._n else 0.0
            self._last = (qs, out)
            return dict(out)

    def clear(self) -> None:
        with self._lock:
            self._inbox.clear()
            self._n = self._head = self._sum = 0
            self._sorted = np.zeros(0, dtype=np.int64)
            self._last = None


def _remove_sorted(a: np.ndarray, gone: np.ndarray) -> np.ndarray:
    """``a`` (sorted) less the values of ``gone`` (sorted, a sub-multiset of ``a``)."""
    pos = np.searchsorted(a, gone, "left")
    # The j-th copy of a repeated value sits j places after its first.
    pos += np.arange(gone.size) - np.searchsorted(gone, gone, "left")
    return np.delete(a, pos)


class SharedSnapshot:
    """One statistics snapshot shared by the gauges of one OpenTelemetry collection.

    ``take()`` (the pool's figures under its lock) runs when a gauge reads first, and again when a gauge
    that already read this snapshot reads a second time: that is the next collection. So a collection
    of all the pool's instruments costs one snapshot, and every gauge of it sees the same state.
    """

    __slots__ = ("_take", "_snap", "_seen", "_lock")

    def __init__(self, take):
        self._take = take
        self._snap = None
        self._seen: set = set()
        self._lock = threading.Lock()

    def read(self, gauge: str) -> dict:
        with self._lock:
            if self._snap is None or gauge in self._seen:
                self._snap = self._take()
                self._seen = set()
            self._seen.add(gauge)
            return self._snap


_GAUGES = (
    ("kvtriton.pool.blocks", "gauge", "{block}", "Blocks by state",
     ("capacity_blocks", "used_blocks", "cached_blocks", "free_blocks")),
    ("kvtriton.pool.utilization", "gauge", "1", "Used over capacity blocks", ("utilization",)),
    ("kvtriton.pool.fragmentation", "gauge", "1", "Internal and external fragmentation",
     ("internal_fragmentation", "external_fragmentation")),
    ("kvtriton.pool.chunks", "gauge", "{chunk}", "Arena chunks held", ("chunks_held",)),
) + tuple((f"kvtriton.pool.{key}", "counter", "1", desc, (key,)) for key, desc in (
    ("requests", "Caches requested"), ("releases", "Caches released"), ("evictions", "Cached blocks evicted"),
    ("hit_blocks", "Prefix-cache hits"), ("miss_blocks", "Prefix-cache misses"),
    ("blocks_moved", "Blocks moved by shrink"), ("cow_copies", "Copy-on-write block copies")))


def register_pool_metrics(pool) -> None:
    """Observable gauges and counters of ``pool`` on its ``Instrumentation``, all read from one
    :class:`SharedSnapshot` of ``pool._stats_snapshot()`` per collection. A closed or collected pool
    reports nothing."""
    ref = weakref.ref(pool)

    def take():
        p = ref()
        if p is None:
            raise PoolClosedError("<collected>")
        return p._stats_snapshot()

    shared = SharedSnapshot(take)

    def reader(name, keys):
        def read():
            p = ref()
            if p is None or p.closed:
                return None
            try:
                s = shared.read(name)
            except PoolClosedError:
                return None
            attrs = {"pool": p.name, "device": str(p.device)}
            if len(keys) == 1:
                return [(s[keys[0]], attrs)]
            return [(s[k], {**attrs, "state": k}) for k in keys]
        return read

    for name, kind, unit, desc, keys in _GAUGES:
        pool._tel.observe(name, kind, unit, desc, reader(name, keys))
