"""One model's block pool over a shared device arena (vLLM's block pool, kvcached's elastic pages).

Block ids index ONE strided view of the whole arena for this pool::

    view = arena.buffer[: n * B].view(spec.dtype).view(n, L, 2, block_size, H, D)   # n = arena_bytes // B

so block ``i`` is the byte range ``[i*B, (i+1)*B)`` and per layer ``K = view[:, l, 0]``,
``V = view[:, l, 1]`` are the NHD caches ``[n, block_size, H, D]`` the kernels take (block stride
``L*2*block_size*H*D`` elements, no copies). A block is *usable* when every chunk it overlaps is held
by this pool; pools of different models (different ``B``) share one arena this way. (Growing by runs of
``ceil(B / chunk)`` adjacent chunks is not enough when ``B`` and the chunk size do not divide each other:
such a run may contain no whole block. Claiming the chunks under a chosen block, cheapest first, is.)

``shrink`` and ``compact`` move blocks and rewrite the owning caches' block tables: block tables, slot
mappings and views of ids taken before them are stale. The moves are launched on the current stream.

A usable block is in exactly one state: *free* (on the free list), *used* (reference count > 0) or
*cached* (reference count 0 but registered in the prefix cache under its block hash: evictable, in
the order the pool's policy chooses). ``free + used + cached == capacity`` at all times.

Block moves and the users of block ids exclude each other. Block ids only change under a live cache
in two ways: by that cache's own ``append`` and ``release`` (use each cache from one thread at a
time), and by ``shrink``/``compact``/``close`` of its pool, which move live blocks or free them. The
latter take the pool's *moves lock* exclusively; ``write_kv``/``read_kv`` hold it shared from taking
their slot mapping to launching their kernel, and so does code inside ``with pool.stable_blocks():``
(take block tables, slot mappings or ``block_ids`` there and launch the kernels that use them before
leaving). A move that starts meanwhile waits for the holders to leave; holders that arrive while a
move waits or runs wait for it to finish (so compaction is not starved), then see the new ids. A
thread inside ``stable_blocks()`` that calls ``shrink``/``compact``/``close`` on the same pool gets
RuntimeError rather than a deadlock. ``pool.kv`` views stay valid until the pool is closed. On CUDA a
move synchronizes the device before and after its kernel, so kernels launched under a shared hold on
any stream are ordered with it; ordering a *released* cache's pending writes with later users of its
blocks across streams is the caller's (one stream, or synchronize), as with torch's allocator.

Locking order: allocator lock -> moves lock (shared or exclusive) -> pool lock -> arena lock (a
reentrant leaf: the arena never calls back). Only ``GPUMemoryAllocator.stats`` holds several pool
locks, taken in ``pool_id`` order; no pool lock is held while waiting for an allocator or moves lock.
A closed pool raises PoolClosedError from every method (``close`` itself is idempotent).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Iterable, Sequence

import numpy as np
import torch

from .. import ops
from ..errors import ArenaClosedError, CacheReleasedError, PoolClosedError, PoolExhaustedError
from ..policies.base import EvictionPolicy, make_policy
from ..spec import ModelSpec, get_spec
from ..telemetry import Instrumentation
from .arena import FREE, Arena
from .cache import VirtualKVCache
from .checks import check_block_hashes, check_count, check_index, check_token_ids, is_int
from .hashing import block_hashes_from_tokens, hash_block_tokens
from .locks import MovesLock
from .stats import LatencyRecorder, ratio


_check_count = check_count


class _StableBlocks:
    """The context manager of :meth:`CachePool.stable_blocks` (a shared hold of the moves lock)."""

    __slots__ = ("_pool",)

    def __init__(self, pool: "CachePool"):
        self._pool = pool

    def __enter__(self):
        pool = self._pool
        pool._moves.acquire_shared()
        if pool._closed:
            pool._moves.release_shared()
            raise PoolClosedError(pool.name)
        return pool

    def __exit__(self, *exc):
        self._pool._moves.release_shared()
        return False


class CachePool:
    """One model's KV blocks: allocation, reference counts, copy-on-write, prefix cache, eviction,
    and elastic growth and shrinking over an :class:`Arena`.

    Usually created by :meth:`GPUMemoryAllocator.create_pool`. ``policy`` is a registered policy name
    (``kvtriton.policies``) or an :class:`EvictionPolicy` instance; its keys are block hashes, which
    stay the same when a block moves. ``initial_chunks`` are claimed now; ``max_chunks`` bounds the
    chunks held (None: the whole arena); each growth claims at least ``grow_chunks`` chunks.
    Growth comes before eviction: a pool takes free arena chunks while it may, then evicts.
    """

    def __init__(self, name: str, spec, arena: Arena, policy="lru", *, pool_id: int = 0,
                 initial_chunks: int = 0, max_chunks: int | None = None, grow_chunks: int = 1,
                 policy_kwargs: dict | None = None, tracer_provider=None, meter_provider=None,
                 latency_window: int = 100_000):
        self.name = str(name)
        self.spec: ModelSpec = get_spec(spec)
        if not isinstance(arena, Arena):
            raise TypeError(f"arena must be an Arena, got {type(arena).__name__}")
        if arena.closed:
            raise ArenaClosedError(f"the arena of {arena.device} is closed")
        self.arena = arena
        self.device = arena.device
        self.pool_id = _check_count("pool_id", pool_id, 0)
        latency_window = _check_count("latency_window", latency_window, 1)
        grow_chunks = _check_count("grow_chunks", grow_chunks, 1)
        initial_chunks = _check_count("initial_chunks", initial_chunks, 0)
        if max_chunks is not None:
            max_chunks = _check_count("max_chunks", max_chunks, 1)
            if initial_chunks > max_chunks:
                raise ValueError(f"initial_chunks={initial_chunks} exceeds max_chunks={max_chunks}")
        if isinstance(policy, EvictionPolicy):
            self.policy = policy
        else:
            self.policy = make_policy(policy, **(policy_kwargs or {}))
        self.policy_name = getattr(self.policy, "name", type(self.policy).__name__)
        self.block_size = self.spec.block_size
        self.block_bytes = self.spec.bytes_per_block
        self.num_blocks = arena.num_bytes // self.block_bytes
        if self.num_blocks < 1:
            raise ValueError(f"a block of model {self.spec.name!r} ({self.block_bytes} bytes) does not fit "
                             f"in the arena of {arena.num_bytes} bytes")
        self.max_chunks = max_chunks
        self.grow_chunks = grow_chunks
        n, spec = self.num_blocks, self.spec
        self.view = (arena.buffer[: n * self.block_bytes].view(spec.dtype)
                     .view(n, spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim))
        self._kv_views = [(self.view[:, layer, 0], self.view[:, layer, 1]) for layer in range(spec.num_layers)]
        C, B = arena.chunk_bytes, self.block_bytes
        idx = np.arange(n, dtype=np.int64)
        self._first_chunk = (idx * B) // C             # chunks overlapped by each block
        self._last_chunk = ((idx + 1) * B - 1) // C
        self._usable = np.zeros(n, dtype=bool)
        # (chunks, blocks) per tiling unit where blocks and chunks tile each other, else None.
        self._unit = (1, C // B) if C % B == 0 else (B // C, 1) if B % C == 0 else None
        self._ref = [0] * n
        self._hash: list = [None] * n
        self._free: list[int] = []        # a stack: the most recently freed block is reused first
        self._cached: dict = {}           # block hash -> block id (prefix cache)
        self._external: set[int] = set()  # blocks handed out by allocate_blocks
        self._caches: dict[int, VirtualKVCache] = {}
        self._next_cache_id = 0
        self._capacity = 0
        self._n_used = 0
        self._n_idle = 0                  # cached blocks with no reference (evictable)
        self._chunks_held = 0
        self.lock = threading.Lock()
        self._moves = MovesLock()         # shared: users of block ids; exclusive: block moves
        self._closed = False
        self._reclaim = None              # set by the allocator: frees other pools' empty chunks
        self._lat = LatencyRecorder(latency_window)
        self._lat_add = self._lat.add
        self._counters = dict(requests=0, releases=0, forks=0, hit_blocks=0, miss_blocks=0, hit_tokens=0,
                              evictions=0, cow_copies=0, blocks_moved=0, grows=0, shrinks=0,
                              chunks_claimed=0, chunks_returned=0, exhausted=0)
        self._tel = Instrumentation(tracer_provider, meter_provider,
                                    {"pool": self.name, "device": str(self.device)})
        self._h_alloc = self._tel.histogram("kvtriton.pool.allocation.duration", "us",
                                            "Latency of CachePool.request")
        if initial_chunks:
            with self.lock:
                got = self._claim_chunks(initial_chunks)
                if got < initial_chunks:
                    self._ungrow_all()
                    self._closed = True
                    raise ValueError(f"initial_chunks={initial_chunks} but only {got} chunks could be "
                                     f"claimed from the arena of {arena.num_chunks} chunks")
        self._register_metrics()

    # ------------------------------------------------------------------ telemetry
    def _register_metrics(self):
        ref = weakref.ref(self)

        def reader(keys, scale=1):
            def read():
                pool = ref()
                if pool is None or pool._closed:
                    return None
                try:
                    s = pool.stats()
                except PoolClosedError:
                    return None
                attrs = {"pool": pool.name, "device": str(pool.device)}
                return [(s[k] * scale, {**attrs, "state": k}) if len(keys) > 1 else (s[k] * scale, attrs)
                        for k in keys]
            return read

        t = self._tel
        t.observe("kvtriton.pool.blocks", "gauge", "{block}", "Blocks by state",
                  reader(["capacity_blocks", "used_blocks", "cached_blocks", "free_blocks"]))
        t.observe("kvtriton.pool.utilization", "gauge", "1", "Used over capacity blocks",
                  reader(["utilization"]))
        t.observe("kvtriton.pool.fragmentation", "gauge", "1", "Internal and external fragmentation",
                  reader(["internal_fragmentation", "external_fragmentation"]))
        t.observe("kvtriton.pool.chunks", "gauge", "{chunk}", "Arena chunks held", reader(["chunks_held"]))
        for key, desc in (("requests", "Caches requested"), ("releases", "Caches released"),
                          ("evictions", "Cached blocks evicted"), ("hit_blocks", "Prefix-cache hits"),
                          ("miss_blocks", "Prefix-cache misses"), ("blocks_moved", "Blocks moved by shrink"),
                          ("cow_copies", "Copy-on-write block copies")):
            t.observe(f"kvtriton.pool.{key}", "counter", "1", desc, reader([key]))

    # ------------------------------------------------------------------ views and tensors
    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError(self.name)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_cache, value_cache)`` of ``layer``: views ``[num_blocks, block_size, H, D]`` (spec dtype)
        of the arena, valid until the pool is closed. Block ids index them; see :meth:`stable_blocks`."""
        views = self._kv_views
        if views is None:
            raise PoolClosedError(self.name)
        if type(layer) is not int:
            layer = check_index("layer", layer, 0, self.spec.num_layers)
        elif not 0 <= layer < self.spec.num_layers:
            raise IndexError(f"layer must be an int in [0, {self.spec.num_layers}), got {layer!r}")
        return views[layer]

    def stable_blocks(self):
        """``with pool.stable_blocks():`` no shrink, compaction or close of this pool moves or frees a
        block until the block exits (they wait; one already running finishes first). Take block
        tables (:meth:`batch_tensors`, ``cache.block_table``), slot mappings or ``block_ids`` inside
        and launch the kernels that use them before leaving. Reentrant; ``write_kv``/``read_kv`` take
        it themselves. Calling ``shrink``/``compact``/``close`` of this pool inside raises RuntimeError."""
        self._check_open()
        return _StableBlocks(self)

    def batch_tensors(self, caches: Sequence[VirtualKVCache], max_blocks: int | None = None):
        """``(block_tables int32 [batch, max_blocks], seq_lens int32 [batch])`` on the pool's device;
        rows are padded with block 0 past each cache's blocks. Valid until the next block move: use
        them inside :meth:`stable_blocks`."""
        if max_blocks is not None:
            max_blocks = check_count("max_blocks", max_blocks, 0)
        with self.lock:
            self._check_open()
            rows, lens = [], []
            for c in caches:
                self._own(c)
                rows.append(list(c._blocks))  # a copy: the cache's own list changes under append
                lens.append(c._seq_len)
        width = max((len(r) for r in rows), default=0)
        if max_blocks is None:
            max_blocks = width
        elif max_blocks < width:
            raise ValueError(f"max_blocks must be >= {width} (the longest block table), got {max_blocks}")
        table = torch.tensor([r + [0] * (max_blocks - len(r)) for r in rows], dtype=torch.int32)
        table = table.view(len(rows), max_blocks)
        seq = torch.tensor(lens, dtype=torch.int32)
        return table.to(self.device), seq.to(self.device)

    # ------------------------------------------------------------------ requests
    def request(self, num_tokens: int | None = None, *, max_tokens: int | None = None,
                token_ids: Sequence[int] | None = None,
                block_hashes: Sequence | None = None, request=None) -> VirtualKVCache:
        """A new cache of ``num_tokens`` tokens (the prompt: ``seq_len == num_tokens`` and its blocks
        allocated; the caller writes their K/V), growing later by ``append`` up to ``max_tokens``
        (None: no limit but the pool's).

        Prefix caching: with ``token_ids`` (``num_tokens`` defaults to their count) the full blocks
        are hashed vLLM-style; or pass ``block_hashes`` (one per block from the first, e.g. expanded
        Mooncake hash ids). The longest cached prefix is shared (``cache.num_cached_tokens``); the
        other hashed blocks are registered for later requests. ``request`` (e.g. a workload
        ``Request``) is handed to the policy's ``on_request`` hook with the block hashes and the hit
        count, for policies that use what a KV cache knows. Raises PoolExhaustedError (pool unchanged)
        when the blocks cannot be found even after growing and evicting, ValueError (pool unchanged)
        on bad arguments: block hashes must be distinct hashable keys other than ``None`` (the pool's
        "no hash" marker), token ids ints.
        """
        t0 = time.perf_counter_ns()
        if (token_ids is None and block_hashes is None and max_tokens is None and request is None
                and type(num_tokens) is int
                and num_tokens >= 0):
            # Fast path (no prefix caching, free blocks at hand): no validation left to do.
            nblocks = -(-num_tokens // self.block_size)
            cache = None
            with self.lock:
                free = self._free
                if len(free) >= nblocks and not self._closed:
                    if nblocks:
                        blocks = free[-nblocks:]
                        del free[-nblocks:]
                        blocks.reverse()
                        ref = self._ref
                        for b in blocks:
                            ref[b] = 1
                        self._n_used += nblocks
                    else:
                        blocks = []
                    cid = self._next_cache_id
                    self._next_cache_id = cid + 1
                    cache = VirtualKVCache(self, cid, blocks, num_tokens, None, 0, None, None)
                    self._caches[cid] = cache
                    self._counters["requests"] += 1
            if cache is not None:
                dt = time.perf_counter_ns() - t0
                self._lat_add(dt)
                if self._tel.metering:
                    self._h_alloc.record(dt / 1e3, self._tel.attributes)
                if self._tel.tracing:
                    with self._tel.span("kvtriton.allocate", blocks=nblocks, hit_blocks=0,
                                        bytes=nblocks * self.block_bytes, tokens=num_tokens):
                        pass
                return cache
        try:
            cache = self._request(num_tokens, max_tokens, token_ids, block_hashes, request)
        except PoolExhaustedError:
            if self._reclaim is None or not self._reclaim(self):
                raise
            cache = self._request(num_tokens, max_tokens, token_ids, block_hashes, request)
        dt = time.perf_counter_ns() - t0
        self._lat_add(dt)
        if self._tel.metering:
            self._h_alloc.record(dt / 1e3, self._tel.attributes)
        return cache

    def _request(self, num_tokens, max_tokens, token_ids, block_hashes, request=None) -> VirtualKVCache:
        # Every argument is checked before the lock is taken: a bad one changes nothing.
        if token_ids is not None:
            if block_hashes is not None:
                raise ValueError("give token_ids or block_hashes, not both")
            token_ids = check_token_ids(token_ids)
            if num_tokens is None:
                num_tokens = len(token_ids)
            elif num_tokens != len(token_ids):
                raise ValueError(f"num_tokens={num_tokens!r} but {len(token_ids)} token_ids were given")
        if num_tokens is None:
            raise ValueError("num_tokens is required (or token_ids)")
        num_tokens = check_count("num_tokens", num_tokens, 0)
        if max_tokens is not None:
            if not is_int(max_tokens) or max_tokens < num_tokens:
                raise ValueError(f"max_tokens must be an int >= num_tokens={num_tokens}, got {max_tokens!r}")
            max_tokens = int(max_tokens)
        bs = self.block_size
        nblocks = -(-num_tokens // bs)
        tail = None
        if token_ids is not None:
            hashes = block_hashes_from_tokens(token_ids, bs)
            tail = token_ids[len(hashes) * bs:]
        elif block_hashes is not None:
            hashes = check_block_hashes(block_hashes)
            if len(hashes) > nblocks:
                raise ValueError(f"block_hashes has {len(hashes)} entries but num_tokens={num_tokens} "
                                 f"spans only {nblocks} blocks of {bs}")
        else:
            hashes = None
        with self.lock:
            self._check_open()
            hits: list[int] = []
            if hashes:
                cached = self._cached
                for h in hashes:
                    b = cached.get(h)
                    if b is None:
                        break
                    hits.append(b)
            need = nblocks - len(hits)
            idle_hits = sum(1 for b in hits if self._ref[b] == 0)
            self._make_room(need, idle_hits)
            ref, policy = self._ref, self.policy
            if hashes:
                # After _make_room: a request that fails leaves the policy untouched too.
                policy.on_request(hashes, len(hits), request)
            hash_of = self._hash
            for b in hits:
                if ref[b] == 0:
                    policy.access_and_pin(hash_of[b])
                    self._n_idle -= 1
                    self._n_used += 1
                else:
                    policy.access(hash_of[b])
                ref[b] += 1
            self._evict_to(need)
            new = self._pop_free(need)
            for b in new:
                ref[b] = 1
            self._n_used += need
            blocks = hits + new
            if hashes:
                for j in range(len(hits), len(hashes)):
                    self._register(blocks[j], hashes[j])
                c = self._counters
                c["hit_blocks"] += len(hits)
                c["miss_blocks"] += len(hashes) - len(hits)
                c["hit_tokens"] += min(len(hits) * bs, num_tokens)
            cid = self._next_cache_id
            self._next_cache_id = cid + 1
            cache = VirtualKVCache(self, cid, blocks, num_tokens, max_tokens,
                                   min(len(hits) * bs, num_tokens), hashes, tail)
            self._caches[cid] = cache
            self._counters["requests"] += 1
        if self._tel.tracing:
            with self._tel.span("kvtriton.allocate", blocks=len(blocks), hit_blocks=len(hits),
                                bytes=len(blocks) * self.block_bytes, tokens=num_tokens):
                pass
        return cache

    def release(self, cache: VirtualKVCache) -> None:
        """Drop ``cache``'s references; its blocks become free, or cached (evictable) when they carry a
        block hash, the last blocks first so a cached prefix is evicted from its end."""
        with self.lock:
            self._check_open()
            self._own(cache)
            blocks = cache._blocks
            self._unref_blocks(blocks)
            cache._released = True
            cache._blocks = []
            del self._caches[cache.cache_id]
            self._counters["releases"] += 1
        if self._tel.tracing:
            with self._tel.span("kvtriton.release", blocks=len(blocks), bytes=len(blocks) * self.block_bytes):
                pass

    def _unref_blocks(self, blocks: list[int]) -> None:
        ref, hashes, free = self._ref, self._hash, self._free
        unpin = []  # the hashes that become evictable, in release order (last block first)
        n_free = len(free)
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                h = hashes[b]
                if h is None:
                    free.append(b)
                else:
                    unpin.append(h)
        self._n_used -= len(unpin) + len(free) - n_free
        if unpin:
            self.policy.unpin_many(unpin)
            self._n_idle += len(unpin)

    def _own(self, cache: VirtualKVCache) -> None:
        if not isinstance(cache, VirtualKVCache):
            raise TypeError(f"cache must be a VirtualKVCache, got {type(cache).__name__}")
        if cache.pool is not self:
            raise ValueError(f"cache belongs to pool {cache.pool.name!r}, not {self.name!r}")
        if cache._released:
            raise CacheReleasedError(f"cache {cache.cache_id} of pool {self.name!r} was already released")

    # --- called by VirtualKVCache under no lock ---------------------------------------------------
    def _append(self, cache: VirtualKVCache, n: int, token_ids) -> None:
        bs = self.block_size
        with self.lock:
            self._check_open()
            if cache._released:
                self._own(cache)  # raises CacheReleasedError
            old_len = cache._seq_len
            if token_ids is None and (cache.max_tokens is None or old_len + n <= cache.max_tokens):
                # Fast path (decode): the tokens fit in the last block, which this cache holds alone.
                blocks = cache._blocks
                if old_len + n <= len(blocks) * bs and (n == 0 or self._ref[blocks[old_len // bs]] == 1):
                    cache._seq_len = old_len + n
                    return
            if cache.max_tokens is not None and cache._seq_len + n > cache.max_tokens:
                raise ValueError(f"append of {n} tokens to a cache of {cache._seq_len} exceeds its "
                                 f"max_tokens={cache.max_tokens}")
            if token_ids is not None and cache._tail is None:
                raise ValueError("token_ids may be given to append only for caches requested with token_ids")
            old_len = cache._seq_len
            blocks = cache._blocks
            new_total = -(-(old_len + n) // bs)
            grow = new_total - len(blocks)
            # The block receiving the first new token is written: copy it first if others hold it.
            j = old_len // bs
            cow = n > 0 and old_len % bs != 0 and self._ref[blocks[j]] > 1
            need = grow + (1 if cow else 0)
            if need:
                self._make_room(need, 0)
                self._evict_to(need)
            new = self._pop_free(need)
            for b in new:
                self._ref[b] = 1
            self._n_used += need
            if cow:
                src = blocks[j]
                dst = new.pop()
                self._copy_block(src, dst)
                blocks[j] = dst
                self._ref[src] -= 1  # > 0: others still hold it
                self._counters["cow_copies"] += 1
            blocks.extend(new)
            cache._seq_len = old_len + n
            if token_ids is not None:
                tail = cache._tail
                tail.extend(token_ids)
                hashes = cache._hashes
                while len(tail) >= bs:
                    parent = hashes[-1] if hashes else None
                    h = hash_block_tokens(parent, tail[:bs])
                    del tail[:bs]
                    hashes.append(h)
                    self._register(blocks[len(hashes) - 1], h)

    def _copy_block(self, src: int, dst: int) -> None:
        ops.copy_blocks(self.view, torch.tensor([src], dtype=torch.int64, device=self.device),
                        torch.tensor([dst], dtype=torch.int64, device=self.device))

    def _fork(self, cache: VirtualKVCache) -> VirtualKVCache:
        with self.lock:
            self._check_open()
            self._own(cache)
            ref = self._ref
            for b in cache._blocks:
                ref[b] += 1
            cid = self._next_cache_id
            self._next_cache_id = cid + 1
            child = VirtualKVCache(self, cid, list(cache._blocks), cache._seq_len, cache.max_tokens,
                                   cache.num_cached_tokens,
                                   None if cache._hashes is None else list(cache._hashes),
                                   None if cache._tail is None else list(cache._tail))
            self._caches[cid] = child
            self._counters["forks"] += 1
            return child

    def _register(self, b: int, h) -> None:
        """Put block ``b`` (held by its writer) in the prefix cache under ``h``, unless ``h`` is there."""
        if h in self._cached or self._hash[b] is not None:
            return
        self._cached[h] = b
        self._hash[b] = h
        self.policy.insert_and_pin(h, 1)

    # ------------------------------------------------------------------ raw block batches
    def allocate_blocks(self, n: int) -> list[int]:
        """``n`` blocks held by the caller (by id, reference count 1), without a cache; blocks held this
        way are never moved by shrink. Give them back with :meth:`free_blocks`."""
        n = _check_count("n", n, 0)
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

    # ------------------------------------------------------------------ capacity management
    def _pop_free(self, k: int) -> list[int]:
        free = self._free
        if k == 0:
            return []
        if k == 1:
            return [free.pop()]
        ids = free[-k:]
        del free[-k:]
        ids.reverse()
        return ids

    def _make_room(self, need: int, idle_hits: int) -> None:
        """Ensure ``need`` blocks can be taken: grow now if the free list is short, then check that
        eviction can cover the rest. On failure undo the growth and raise (the pool is unchanged)."""
        short = need - len(self._free)
        if short <= 0:
            return
        claimed = self._grow_blocks(short)
        if len(self._free) + self._n_idle - idle_hits >= need:
            return
        if claimed:
            self._ungrow(claimed)
        self._counters["exhausted"] += 1
        raise PoolExhaustedError(self.name, need, len(self._free), self._n_idle - idle_hits)

    def _evict_to(self, need: int) -> None:
        if len(self._free) >= need:
            return
        n = need - len(self._free)
        for _ in range(n):
            self._evict_one()
        if self._tel.tracing:
            with self._tel.span("kvtriton.evict", blocks=n, bytes=n * self.block_bytes):
                pass

    def _evict_one(self) -> int:
        h = self.policy.victim()
        b = self._cached.pop(h)
        if self._ref[b] != 0:
            raise RuntimeError(f"policy {self.policy_name!r} chose block {b}, which is in use")
        self._hash[b] = None
        self._n_idle -= 1
        self._free.append(b)
        self._counters["evictions"] += 1
        return b

    def evict(self, n: int | None = None) -> int:
        """Evict up to ``n`` cached, unreferenced blocks (all when None) in policy order; returns the count."""
        if n is not None:
            n = _check_count("n", n, 0)
        with self.lock:
            self._check_open()
            k = self._n_idle if n is None else min(n, self._n_idle)
            for _ in range(k):
                self._evict_one()
        if k and self._tel.tracing:
            with self._tel.span("kvtriton.evict", blocks=k, bytes=k * self.block_bytes):
                pass
        return k

    def _claim_chunks(self, k: int) -> int:
        """Claim ``k`` more chunks (for ``initial_chunks``); returns the number claimed."""
        before = self._chunks_held
        if self._unit is not None:  # whole tiling units only
            k = -(-k // self._unit[0]) * self._unit[0]
        self._grow_blocks(1 << 62, min_chunks=k, max_new_chunks=k)
        return self._chunks_held - before

    def _grow_blocks(self, need: int, min_chunks: int | None = None, max_new_chunks: int | None = None) -> list:
        """Claim arena chunks until ``need`` more blocks are usable (and at least ``min_chunks`` chunks,
        default ``grow_chunks``, where the arena allows); returns the chunks claimed."""
        if min_chunks is None:
            # Geometric growth (an eighth of what is held, at least grow_chunks) keeps the number of
            # O(arena) growth scans logarithmic in a pool's size; the allocator takes empty chunks
            # back from a pool when another one runs short, so the extra is never stranded.
            min_chunks = max(self.grow_chunks, self._chunks_held // 8)
        limit = None if self.max_chunks is None else self.max_chunks - self._chunks_held
        if max_new_chunks is not None:
            limit = max_new_chunks if limit is None else min(limit, max_new_chunks)
        if limit is not None and limit <= 0:
            return []
        arena, C = self.arena, self.arena.chunk_bytes
        # The arena's lock is held across choosing free chunks and claiming them (arena.claim takes
        # it again: it is reentrant), so no other pool takes them in between.
        with arena.lock:
            if arena.closed:
                raise ArenaClosedError(f"the arena of {arena.device} is closed")
            if arena.n_free == 0:
                return []
            if self._unit is not None:
                claimed, newly = self._grow_aligned(arena.owner, need, min_chunks, limit)
            else:
                claimed, newly = self._grow_general(arena.owner, need, min_chunks, limit)
        if claimed:
            newly.sort(reverse=True)  # low ids are popped first
            self._free[:0] = newly    # behind recently freed blocks, which are reused first
            self._capacity += len(newly)
            self._chunks_held += len(claimed)
            self._counters["grows"] += 1
            self._counters["chunks_claimed"] += len(claimed)
            if self._tel.tracing:
                with self._tel.span("kvtriton.grow", chunks=len(claimed), blocks=len(newly),
                                    bytes=len(claimed) * C):
                    pass
        return claimed

    def _grow_aligned(self, owner, need, min_chunks, limit):
        """Growth when blocks and chunks tile each other (``chunk % B == 0`` or ``B % chunk == 0``):
        units of ``uc`` chunks hold exactly ``ub`` blocks, so whole units are claimed, first ones first."""
        uc, ub = self._unit
        me = self.pool_id
        units = len(owner) // uc
        o = owner[: units * uc].reshape(units, uc)
        if uc == 1:
            eligible = np.flatnonzero(o[:, 0] == FREE)
        else:
            # A unit partly held (after a shrink took one of its chunks) is finished first.
            ok = ((o == FREE) | (o == me)).all(axis=1) & ~(o == me).all(axis=1)
            eligible = np.flatnonzero(ok)
            eligible = eligible[np.argsort((o[eligible] == FREE).sum(axis=1), kind="stable")]
        m = max(-(-need // ub), -(-min_chunks // uc))
        if limit is not None:
            m = min(m, limit // uc)
        chosen = eligible[:m]
        if chosen.size == 0:
            return [], []
        chunks = (chosen[:, None] * uc + np.arange(uc)).ravel()
        chunks = chunks[owner[chunks] == FREE]
        self.arena.claim(chunks, me)
        blocks = (chosen[:, None] * ub + np.arange(ub)).ravel()
        blocks = blocks[blocks < self.num_blocks]
        self._usable[blocks] = True
        return chunks.tolist(), blocks.tolist()

    def _grow_general(self, owner, need, min_chunks, limit):
        """Growth for any block and chunk sizes: claim the chunks under chosen blocks, cheapest first."""
        me = self.pool_id
        fc, lc = self._first_chunk, self._last_chunk
        B, C, n = self.block_bytes, self.arena.chunk_bytes, self.num_blocks
        claimed: list[int] = []
        newly: list[int] = []
        not_ok = np.concatenate(([0], np.cumsum((owner != FREE) & (owner != me))))
        is_free = np.concatenate(([0], np.cumsum(owner == FREE)))
        feasible = (not_ok[lc + 1] - not_ok[fc]) == 0
        cost = is_free[lc + 1] - is_free[fc]
        feasible &= cost > 0
        usable = self._usable
        for b in self._cheapest_first(feasible, cost):
            if len(newly) >= need and len(claimed) >= min_chunks:
                break
            if limit is not None and len(claimed) >= limit:
                break
            new_chunks = [c for c in range(int(fc[b]), int(lc[b]) + 1) if owner[c] == FREE]
            if not new_chunks:
                continue
            if limit is not None and len(claimed) + len(new_chunks) > limit:
                continue
            self.arena.claim(new_chunks, me)
            claimed.extend(new_chunks)
            lo = (new_chunks[0] * C) // B
            hi = min(n - 1, ((new_chunks[-1] + 1) * C - 1) // B)
            for bb in range(lo, hi + 1):
                if not usable[bb] and (owner[fc[bb]: lc[bb] + 1] == me).all():
                    usable[bb] = True
                    newly.append(bb)
        return claimed, newly

    @staticmethod
    def _cheapest_first(mask, cost):
        """Indices where ``mask`` holds, by increasing ``cost`` then index, produced lazily (a growth
        usually stops after a few)."""
        for c in np.flatnonzero(np.bincount(cost[mask])).tolist():
            idx = np.flatnonzero(mask & (cost == c))
            for i in range(0, idx.size, 64):
                yield from idx[i:i + 64].tolist()

    def _blocks_overlapping(self, chunks) -> np.ndarray:
        """Usable blocks overlapping any chunk in ``chunks``."""
        C, B, n = self.arena.chunk_bytes, self.block_bytes, self.num_blocks
        out = []
        for c in chunks:
            lo, hi = (int(c) * C) // B, min(n - 1, ((int(c) + 1) * C - 1) // B)
            out.extend(range(lo, hi + 1))
        out = np.unique(np.asarray(out, dtype=np.int64))
        return out[self._usable[out]] if out.size else out

    def _ungrow(self, chunks: list, undo: bool = True) -> None:
        """Give back ``chunks`` (all their blocks are free); ``undo``: they were just claimed by a growth
        that is being rolled back, so its counts are rolled back too."""
        lost = self._blocks_overlapping(chunks)
        lost_set = set(lost.tolist())
        self._free = [b for b in self._free if b not in lost_set]
        self._usable[lost] = False
        self._capacity -= len(lost)
        self.arena.give_back(chunks, self.pool_id)
        self._chunks_held -= len(chunks)
        if undo:
            self._counters["chunks_claimed"] -= len(chunks)
            self._counters["grows"] -= 1

    def _ungrow_all(self):
        held = self.arena.chunks_of(self.pool_id).tolist()
        if held:
            self._ungrow(held)

    def grow(self, num_chunks: int | None = None, *, num_blocks: int | None = None) -> int:
        """Claim ``num_chunks`` chunks (rounded up to whole blocks where a block spans several chunks),
        or enough chunks for ``num_blocks`` more usable blocks, from the arena now; returns the chunks
        claimed (fewer where the arena or ``max_chunks`` runs out)."""
        if (num_chunks is None) == (num_blocks is None):
            raise ValueError("give exactly one of num_chunks or num_blocks")
        if num_chunks is not None:
            num_chunks = _check_count("num_chunks", num_chunks, 0)
        else:
            num_blocks = _check_count("num_blocks", num_blocks, 0)
        with self.lock:
            self._check_open()
            if num_chunks is not None:
                return self._claim_chunks(num_chunks)
            return len(self._grow_blocks(num_blocks, min_chunks=0))

    def shrink(self, num_chunks: int, *, evict: bool = True) -> int:
        """Give ``num_chunks`` chunks back to the arena, emptying them first: live blocks in the chosen
        chunks move into free blocks of the others in ONE ``ops.move_blocks`` call over the pool's
        ``[n, L, 2, block_size, H, D]`` view, and the owning caches' block tables and the prefix cache
        follow. Cached (unreferenced) blocks there move too while free blocks remain; with ``evict``
        the policy's victims make room (anywhere in the pool), else the shrink fails. Chunks holding
        blocks from ``allocate_blocks`` are never chosen. Raises PoolExhaustedError (nothing changed)
        when the live blocks cannot fit in the remaining chunks; returns ``num_chunks``.

        Waits for running ``write_kv``/``read_kv`` calls and ``stable_blocks()`` holders of this pool;
        block ids taken outside them before the shrink are stale after it.
        """
        num_chunks = _check_count("num_chunks", num_chunks, 0)
        moves = self._moves
        moves.acquire_exclusive("shrink")  # before the pool lock: see the module's locking order
        try:
            with self.lock:
                self._check_open()
                return self._shrink(num_chunks, evict) if num_chunks else 0
        finally:
            moves.release_exclusive()

    def _shrink(self, num_chunks: int, evict: bool, probe: bool = False) -> int:
        """Give back ``num_chunks`` chunks (see :meth:`shrink`). With ``probe`` only check that it is
        possible: raise as the real call would, change nothing, count nothing."""
        held = self.arena.chunks_of(self.pool_id)
        if num_chunks > len(held):
            raise ValueError(f"num_chunks must be <= the {len(held)} chunks pool {self.name!r} holds, "
                             f"got {num_chunks}")
        ref, hashes, ext = self._ref, self._hash, self._external
        C, B, n = self.arena.chunk_bytes, self.block_bytes, self.num_blocks
        # Score each held chunk by the live blocks it would force to move; skip pinned-by-id chunks.
        scores = []
        for c in held.tolist():
            lo, hi = (c * C) // B, min(n - 1, ((c + 1) * C - 1) // B)
            used = idle = 0
            pinned = False
            for b in range(lo, hi + 1):
                if not self._usable[b]:
                    continue
                if b in ext:
                    pinned = True
                    break
                if ref[b]:
                    used += 1
                elif hashes[b] is not None:
                    idle += 1
            if not pinned:
                scores.append((used, idle, -c, c))
        if len(scores) < num_chunks:
            raise ValueError(f"num_chunks={num_chunks} but only {len(scores)} chunks of pool {self.name!r} "
                             f"hold no blocks from allocate_blocks")
        scores.sort()
        chosen = [s[3] for s in scores[:num_chunks]]
        lost = self._blocks_overlapping(chosen)
        lost_set = set(lost.tolist())
        used_lost = [b for b in lost_set if ref[b] > 0]
        idle_lost = {b for b in lost_set if ref[b] == 0 and hashes[b] is not None}
        rem_free = sum(1 for b in self._free if b not in lost_set)
        idle_out = self._n_idle - len(idle_lost)
        if len(used_lost) > rem_free + (idle_out if evict else 0) or \
                (not evict and len(used_lost) + len(idle_lost) > rem_free):
            if not probe:
                self._counters["exhausted"] += 1
            raise PoolExhaustedError(
                self.name, len(used_lost), rem_free, idle_out if evict else 0,
                message=f"pool {self.name!r} cannot shrink by {num_chunks} chunks: {len(used_lost)} used "
                        f"and {len(idle_lost)} cached blocks live there, {rem_free} blocks free and "
                        f"{idle_out} evictable in the other chunks (evict={evict})")
        if probe:
            return num_chunks
        evicted = 0
        while rem_free < len(used_lost) + len(idle_lost) and self._n_idle > 0:
            b = self._evict_one()
            evicted += 1
            if b in idle_lost:
                idle_lost.discard(b)
            else:
                rem_free += 1
        src = sorted(used_lost) + sorted(idle_lost)
        keep_free = [b for b in self._free if b not in lost_set]
        dst = keep_free[len(keep_free) - len(src):] if src else []
        keep_free = keep_free[: len(keep_free) - len(src)]
        if src:
            cuda = self.device.type == "cuda"
            if cuda:
                # Kernels launched under shared holds, on any stream, finish before the move reads.
                torch.cuda.synchronize(self.device)
            ops.move_blocks(self.view, torch.tensor(src, dtype=torch.int64, device=self.device),
                            torch.tensor(dst, dtype=torch.int64, device=self.device))
            if cuda:
                # ...and the move finishes before a kernel launched on another stream after we return.
                torch.cuda.current_stream(self.device).synchronize()
            mapping = dict(zip(src, dst))
            for s, d in mapping.items():
                ref[d], hashes[d] = ref[s], hashes[s]
                if hashes[d] is not None:
                    self._cached[hashes[d]] = d
                ref[s], hashes[s] = 0, None
            for cache in self._caches.values():
                bl = cache._blocks
                if any(b in mapping for b in bl):
                    cache._blocks = [mapping.get(b, b) for b in bl]
        self._free = keep_free
        self._usable[lost] = False
        self._capacity -= len(lost)
        self.arena.give_back(chosen, self.pool_id)
        self._chunks_held -= len(chosen)
        self._counters["shrinks"] += 1
        self._counters["chunks_returned"] += len(chosen)
        self._counters["blocks_moved"] += len(src)
        if self._tel.tracing:
            with self._tel.span("kvtriton.shrink", chunks=len(chosen), blocks=len(src), evicted=evicted,
                                bytes=len(chosen) * C):
                pass
        return len(chosen)

    def release_free_chunks(self) -> int:
        """Give back every held chunk whose usable blocks are all free (no moves); returns the count."""
        with self.lock:
            self._check_open()
            held = self.arena.chunks_of(self.pool_id).tolist()
            C, B, n = self.arena.chunk_bytes, self.block_bytes, self.num_blocks
            ref, hashes = self._ref, self._hash
            empty = []
            for c in held:
                lo, hi = (c * C) // B, min(n - 1, ((c + 1) * C - 1) // B)
                if all(not self._usable[b] or (ref[b] == 0 and hashes[b] is None) for b in range(lo, hi + 1)):
                    empty.append(c)
            if empty:
                self._ungrow(empty, undo=False)
                self._counters["chunks_returned"] += len(empty)
            return len(empty)

    def compact(self, *, evict: bool = False) -> int:
        """Pack live blocks into as few chunks as they allow and give the rest back (see :meth:`shrink`,
        also for how it waits for users of block ids); returns the chunks given back."""
        moves = self._moves
        moves.acquire_exclusive("compact")  # before the pool lock: see the module's locking order
        try:
            with self.lock:
                self._check_open()
                released = self._compact(evict)
        finally:
            moves.release_exclusive()
        if self._tel.tracing:
            with self._tel.span("kvtriton.compact", chunks=released, bytes=released * self.arena.chunk_bytes):
                pass
        return released

    def _compact(self, evict: bool) -> int:
        held = self._chunks_held
        live = self._n_used + (0 if evict else self._n_idle)
        per_chunk = max(1.0, self.arena.chunk_bytes / self.block_bytes)
        k = held - int(np.ceil(live / per_chunk))
        # Feasibility falls monotonically with the number of chunks given back (the emptiest
        # go first), so binary-search the largest feasible count with side-effect-free probes.
        lo, hi = 0, max(k, 0)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                self._shrink(mid, evict, probe=True)
                lo = mid
            except (PoolExhaustedError, ValueError):
                hi = mid - 1
        return self._shrink(lo, evict) if lo > 0 else 0

    # ------------------------------------------------------------------ statistics
    @property
    def capacity_blocks(self) -> int:
        return self._capacity

    @property
    def free_blocks_count(self) -> int:
        return len(self._free)

    def stats(self) -> dict:
        """Plain numbers: blocks and bytes by state, utilization, fragmentation, hits, evictions, chunks
        held and ``request`` latency percentiles (microseconds)."""
        with self.lock:
            self._check_open()
            out = self._stats_locked()
        out.update(self._latency_stats())  # not under the lock: a percentile over the window is slow
        return out

    def _latency_stats(self) -> dict:
        return {f"alloc_latency_{k}": v for k, v in self._lat.percentiles_us().items()}

    def _stats_locked(self) -> dict:
        """:meth:`stats` for a caller holding the pool's lock (also of a closed one, which holds nothing)."""
        bs = self.block_size
        # A block's fill is the most tokens any cache holding it has in it: the blocks before a
        # cache's last written one are full, the last may be partial, reserved ones past it hold 0.
        full: set[int] = set()
        partial: dict[int, int] = {}
        tokens = 0
        for c in self._caches.values():
            n = c._seq_len
            tokens += n
            k = -(-n // bs)
            if not k:
                continue
            blocks = c._blocks
            full.update(blocks[:k - 1])
            b, f = blocks[k - 1], n - (k - 1) * bs
            if f == bs:
                full.add(b)
            elif f > partial.get(b, 0):
                partial[b] = f
        part = [f for b, f in partial.items() if b not in full]
        held_slots = (len(full) + len(part)) * bs
        internal = ratio(held_slots - len(full) * bs - sum(part), held_slots)
        cap, used, idle, free = self._capacity, self._n_used, self._n_idle, len(self._free)
        held_bytes = self._chunks_held * self.arena.chunk_bytes
        out = {
            "capacity_blocks": cap, "used_blocks": used, "cached_blocks": idle, "free_blocks": free,
            "capacity_bytes": cap * self.block_bytes, "used_bytes": used * self.block_bytes,
            "cached_bytes": idle * self.block_bytes, "free_bytes": free * self.block_bytes,
            "block_bytes": self.block_bytes, "block_size": bs,
            "utilization": ratio(used, cap),
            "internal_fragmentation": internal,
            "external_fragmentation": 1.0 - ratio(used * self.block_bytes, held_bytes) if held_bytes else 0.0,
            "chunks_held": self._chunks_held, "held_bytes": held_bytes,
            "live_caches": len(self._caches), "live_tokens": tokens,
            "prefix_cache_entries": len(self._cached),
            "hit_rate": ratio(self._counters["hit_blocks"],
                              self._counters["hit_blocks"] + self._counters["miss_blocks"]),
        }
        out.update(self._counters)
        return out

    def reset_latency(self) -> None:
        self._check_open()
        self._lat.clear()

    # ------------------------------------------------------------------ checks and teardown
    def validate(self) -> None:
        """Check every invariant (O(pool size)); raises AssertionError naming the first broken one."""
        with self.lock:
            self._check_open()
            usable = set(np.flatnonzero(self._usable).tolist())
            assert len(usable) == self._capacity, "capacity != usable blocks"
            free = self._free
            assert len(set(free)) == len(free), "duplicate block on the free list"
            assert set(free) <= usable, "free list holds an unusable block"
            holders = [0] * self.num_blocks
            for c in self._caches.values():
                assert len(set(c._blocks)) == len(c._blocks), f"cache {c.cache_id} holds a block twice"
                for b in c._blocks:
                    holders[b] += 1
            for b in self._external:
                holders[b] += 1
            used = idle = 0
            for b in usable:
                assert self._ref[b] == holders[b], f"block {b}: ref {self._ref[b]} != {holders[b]} holders"
                if self._ref[b] > 0:
                    used += 1
                    assert b not in free, f"used block {b} is on the free list"
                elif self._hash[b] is not None:
                    idle += 1
                    assert b not in free, f"cached block {b} is on the free list"
            assert all(holders[b] == 0 and self._hash[b] is None for b in range(self.num_blocks)
                       if b not in usable), "an unusable block is held or cached"
            assert used == self._n_used, f"used count {self._n_used} != {used}"
            assert idle == self._n_idle, f"cached count {self._n_idle} != {idle}"
            assert len(free) + used + idle == self._capacity, "free + used + cached != capacity"
            assert None not in self._cached, "None (the no-hash marker) is a prefix-cache key"
            assert len(self._cached) == sum(h is not None for h in self._hash), "hash map size"
            for h, b in self._cached.items():
                assert self._hash[b] == h, f"hash map points {h!r} at block {b} holding {self._hash[b]!r}"
            assert len(self.policy) == len(self._cached), "policy residents != cached blocks"
            assert self.policy.num_evictable == self._n_idle, "policy evictable != cached unreferenced"
            assert self.arena.count_of(self.pool_id) == self._chunks_held, "chunks held"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release every cache and give all chunks back (idempotent). Waits for the holders of
        :meth:`stable_blocks` (and running ``write_kv``/``read_kv``) to leave, so no kernel writes into a
        chunk after it went back to the arena. Later use of the pool raises PoolClosedError, of its
        caches CacheReleasedError."""
        if self._closed:
            return
        moves = self._moves
        moves.acquire_exclusive("close")
        try:
            with self.lock:
                if self._closed:
                    return
                if self.device.type == "cuda" and self._n_used:
                    torch.cuda.synchronize(self.device)  # kernels on any stream land before the chunks go
                for cache in list(self._caches.values()):
                    cache._released = True
                    cache._blocks = []
                self._caches.clear()
                self._closed = True
                self._kv_views = None
                try:
                    self.arena.release_all(self.pool_id)
                except ArenaClosedError:
                    pass  # the arena went first: nothing left to give back
                self._free = []
                self._usable[:] = False
                self._external.clear()
                self._cached.clear()
                self._hash = [None] * self.num_blocks
                self._ref = [0] * self.num_blocks
                self._capacity = self._n_used = self._n_idle = self._chunks_held = 0
                self.view = None  # so the arena's memory is freed once the allocator lets it go
        finally:
            moves.release_exclusive()

    def __repr__(self) -> str:
        return (f"CachePool({self.name!r}, spec={self.spec.name!r}, device={self.device}, "
                f"policy={self.policy_name!r}, blocks={self._n_used}/{self._capacity})")


BlockPool = CachePool
