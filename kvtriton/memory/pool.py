"""One model's block pool over a shared device arena (vLLM's block pool, kvcached's elastic pages).

Block ids index ONE strided view of the whole arena for this pool::

    view = arena.buffer[: n * B].view(spec.dtype).view(n, L, 2, block_size, H, D)   # n = arena_bytes // B

so block ``i`` is the byte range ``[i*B, (i+1)*B)`` and per layer ``K = view[:, l, 0]``,
``V = view[:, l, 1]`` are the NHD caches ``[n, block_size, H, D]`` the kernels take (block stride
``L*2*block_size*H*D`` elements, no copies). A block is *usable* when every chunk it overlaps is held
by this pool; pools of different models (different ``B``) share one arena this way. Which chunks to
claim, give back and empty is planned in :mod:`kvtriton.memory.chunk_planner` (pure numpy); the
statistics are kept as they change (:mod:`kvtriton.memory.pool_stats`); each sequence's block table
and length belong to its :class:`VirtualKVCache`, which the pool changes only through the cache's
methods.

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
from typing import Sequence

import numpy as np
import torch

from .. import ops
from ..errors import ArenaClosedError, CacheReleasedError, PoolClosedError, PoolExhaustedError
from ..policies.base import EvictionPolicy, make_policy
from ..spec import ModelSpec, get_spec
from ..telemetry import Instrumentation
from .arena import Arena
from .cache import VirtualKVCache
from .checks import check_count, check_index, check_pool_invariants, check_request_args
from .chunk_planner import ChunkGeometry
from .elastic import ElasticCapacity
from .locks import MovesLock, SharedHold
from .pool_stats import COUNTER_KEYS, LatencyWindow, PoolStatistics, TailFill, register_pool_metrics
from .raw_blocks import RawBlocks


class CachePool(ElasticCapacity, PoolStatistics, RawBlocks):
    """One model's KV blocks: allocation, reference counts, copy-on-write, prefix cache, eviction,
    and elastic growth and shrinking over an :class:`Arena` (:class:`ElasticCapacity`), statistics
    (:class:`PoolStatistics`), blocks held by id without a cache (:class:`RawBlocks`).

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
        self.pool_id = check_count("pool_id", pool_id, 0)
        latency_window = check_count("latency_window", latency_window, 1)
        self.grow_chunks = check_count("grow_chunks", grow_chunks, 1)
        initial_chunks = check_count("initial_chunks", initial_chunks, 0)
        if max_chunks is not None:
            max_chunks = check_count("max_chunks", max_chunks, 1)
            if initial_chunks > max_chunks:
                raise ValueError(f"initial_chunks={initial_chunks} exceeds max_chunks={max_chunks}")
        self.max_chunks = max_chunks
        self.policy = policy if isinstance(policy, EvictionPolicy) else make_policy(policy, **(policy_kwargs or {}))
        self.policy_name = getattr(self.policy, "name", type(self.policy).__name__)
        self.block_size = self.spec.block_size
        self.block_bytes = self.spec.bytes_per_block
        self.num_blocks = arena.num_bytes // self.block_bytes
        if self.num_blocks < 1:
            raise ValueError(f"a block of model {self.spec.name!r} ({self.block_bytes} bytes) does not fit "
                             f"in the arena of {arena.num_bytes} bytes")
        self._init_state(latency_window, tracer_provider, meter_provider)
        if initial_chunks:
            self._claim_initial(initial_chunks)
        register_pool_metrics(self)

    def _init_state(self, latency_window: int, tracer_provider, meter_provider) -> None:
        n, spec = self.num_blocks, self.spec
        self.view = (self.arena.buffer[: n * self.block_bytes].view(spec.dtype)
                     .view(n, spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim))
        self._kv_views = [(self.view[:, layer, 0], self.view[:, layer, 1]) for layer in range(spec.num_layers)]
        self.geometry = ChunkGeometry(n, self.block_bytes, self.arena.chunk_bytes)
        self._init_blocks()
        self._caches: dict[int, VirtualKVCache] = {}
        self._next_cache_id = 0
        self.lock = threading.Lock()
        self._moves = MovesLock()         # shared: users of block ids; exclusive: block moves
        self._closed = False
        self._reclaim = None              # set by the allocator: frees other pools' empty chunks
        self._lat = LatencyWindow(latency_window)
        self._lat_add = self._lat.add
        self._counters = dict.fromkeys(COUNTER_KEYS, 0)
        self._tel = Instrumentation(tracer_provider, meter_provider,
                                    {"pool": self.name, "device": str(self.device)})
        self._h_alloc = self._tel.histogram("kvtriton.pool.allocation.duration", "us",
                                            "Latency of CachePool.request")

    def _init_blocks(self) -> None:
        """Every block unusable, free of holders and hashes, no chunk held (a new or closed pool)."""
        n = self.num_blocks
        self._usable = np.zeros(n, dtype=bool)
        self._ref = [0] * n
        self._hash: list = [None] * n
        self._free: list[int] = []        # a stack: the most recently freed block is reused first
        self._cached: dict = {}           # block hash -> block id (prefix cache)
        self._external: set[int] = set()  # blocks handed out by allocate_blocks
        self._capacity = self._n_used = self._chunks_held = 0
        self._n_idle = 0                  # cached blocks with no reference (evictable)
        self._live_tokens = 0             # sum of the live caches' seq_len
        self._cache_refs = 0              # sum of the live caches' len(blocks)
        self._tails = TailFill(self.block_size)

    # ------------------------------------------------------------------ views and tensors
    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError(self.name)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def moves_lock(self) -> MovesLock:
        """The pool's moves lock (see :meth:`stable_blocks`); ``write_kv``/``read_kv`` hold it shared."""
        return self._moves

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
        return SharedHold(self._moves, self._check_open, self)

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
        cache, nblocks = None, -1
        if (token_ids is None and block_hashes is None and max_tokens is None and request is None
                and type(num_tokens) is int and num_tokens >= 0):
            # Fast path (no prefix caching, free blocks at hand): no validation left to do.
            nblocks = -(-num_tokens // self.block_size)
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
                    self._cache_refs += nblocks
                    self._live_tokens += num_tokens
                    self._counters["requests"] += 1
        if cache is None:
            try:
                cache = self._request(num_tokens, max_tokens, token_ids, block_hashes, request)
            except PoolExhaustedError:
                if self._reclaim is None or not self._reclaim(self):
                    raise
                cache = self._request(num_tokens, max_tokens, token_ids, block_hashes, request)
            nblocks = -1                   # its span was emitted inside
        dt = time.perf_counter_ns() - t0
        self._lat_add(dt)
        if self._tel.metering:
            self._h_alloc.record(dt / 1e3, self._tel.attributes)
        if nblocks >= 0 and self._tel.tracing:  # the fast path times the request alone
            with self._tel.span("kvtriton.allocate", blocks=nblocks, hit_blocks=0,
                                bytes=nblocks * self.block_bytes, tokens=num_tokens):
                pass
        return cache

    def _request(self, num_tokens, max_tokens, token_ids, block_hashes, request=None) -> VirtualKVCache:
        # Every argument is checked before the lock is taken: a bad one changes nothing.
        num_tokens, max_tokens, hashes, tail = check_request_args(num_tokens, max_tokens, token_ids, block_hashes,
                                                                  self.block_size)
        bs = self.block_size
        nblocks = -(-num_tokens // bs)
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
            self._make_room(need, sum(1 for b in hits if self._ref[b] == 0))
            if hashes:
                # After _make_room: a request that fails leaves the policy untouched too.
                self.policy.on_request(hashes, len(hits), request)
            self._pin_hits(hits)
            self._evict_to(need)
            new = self._pop_free(need)
            ref = self._ref
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
            tf, partial = self._tails, num_tokens % bs != 0
            if hits and (tf.shared or tf.alone or (partial and not new)):
                tf.hits(ref, cache, hits, partial and not new)
            if new and partial:
                tf.new_tail(cache, new[-1], self._hash[new[-1]] is not None)
            self._caches[cid] = cache
            self._cache_refs += nblocks
            self._live_tokens += num_tokens
            self._counters["requests"] += 1
        if self._tel.tracing:
            with self._tel.span("kvtriton.allocate", blocks=len(blocks), hit_blocks=len(hits),
                                bytes=len(blocks) * self.block_bytes, tokens=num_tokens):
                pass
        return cache

    def _pin_hits(self, hits: list[int]) -> None:
        """One more reference on each prefix-cache hit; idle hits leave the evictable set."""
        ref, policy, hash_of = self._ref, self.policy, self._hash
        for b in hits:
            if ref[b] == 0:
                policy.access_and_pin(hash_of[b])
                self._n_idle -= 1
                self._n_used += 1
            else:
                policy.access(hash_of[b])
            ref[b] += 1

    def release(self, cache: VirtualKVCache) -> None:
        """Drop ``cache``'s references; its blocks become free, or cached (evictable) when they carry a
        block hash, the last blocks first so a cached prefix is evicted from its end."""
        with self.lock:
            self._check_open()
            self._own(cache)
            self._cache_refs -= len(cache._blocks)
            self._live_tokens -= cache._seq_len
            tf = self._tails
            if tf.shared or tf.alone:  # else the cache shares no partial block: nothing to correct
                tf.release(self._ref, self._hash, cache)
            blocks = cache._drop()
            self._unref_blocks(blocks)
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
                    if n:
                        cache._advance(n)
                        self._live_tokens += n
                    return
            self._append_blocks(cache, n, token_ids)

    def _append_blocks(self, cache: VirtualKVCache, n: int, token_ids) -> None:
        """:meth:`_append` past the fast path: new blocks, copy-on-write, prefix hashing."""
        if cache.max_tokens is not None and cache._seq_len + n > cache.max_tokens:
            raise ValueError(f"append of {n} tokens to a cache of {cache._seq_len} exceeds its "
                             f"max_tokens={cache.max_tokens}")
        if token_ids is not None and cache._tail is None:
            raise ValueError("token_ids may be given to append only for caches requested with token_ids")
        bs, ref = self.block_size, self._ref
        old_len, blocks = cache._seq_len, cache._blocks
        grow = -(-(old_len + n) // bs) - len(blocks)
        # The block receiving the first new token is written: copy it first if others hold it.
        j = old_len // bs
        cow = n > 0 and old_len % bs != 0 and ref[blocks[j]] > 1
        need = grow + (1 if cow else 0)
        if need:
            self._make_room(need, 0)
            self._evict_to(need)
        new = self._pop_free(need)
        for b in new:
            ref[b] = 1
        self._n_used += need
        swap = None
        if cow:
            src, dst = blocks[j], new.pop()
            self._copy_block(src, dst)
            self._tails.leave(ref, self._hash, cache, src)
            ref[src] -= 1  # > 0: others still hold it
            self._counters["cow_copies"] += 1
            swap = (j, dst)
        self._cache_refs += len(new)
        self._live_tokens += n
        cache._extend(n, new, swap)
        if token_ids is not None:
            for i, h in cache._extend_tokens(token_ids, bs):
                self._register(cache._blocks[i], h)

    def _copy_block(self, src: int, dst: int) -> None:
        ops.copy_blocks(self.view, torch.tensor([src], dtype=torch.int64, device=self.device),
                        torch.tensor([dst], dtype=torch.int64, device=self.device))

    def _fork(self, cache: VirtualKVCache) -> VirtualKVCache:
        with self.lock:
            self._check_open()
            self._own(cache)
            cid = self._next_cache_id
            self._next_cache_id = cid + 1
            child = cache._child(cid)
            blocks, ref = cache._blocks, self._ref
            if cache._seq_len % self.block_size:
                self._tails.fork(ref, cache, child, blocks[-1])
            for b in blocks:
                ref[b] += 1
            self._caches[cid] = child
            self._cache_refs += len(blocks)
            self._live_tokens += cache._seq_len
            self._counters["forks"] += 1
            return child

    def _register(self, b: int, h) -> None:
        """Put block ``b`` (held by its writer) in the prefix cache under ``h``, unless ``h`` is there."""
        if h in self._cached or self._hash[b] is not None:
            return
        self._cached[h] = b
        self._hash[b] = h
        self.policy.insert_and_pin(h, 1)

    # ------------------------------------------------------------------ free list and eviction
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
            n = check_count("n", n, 0)
        with self.lock:
            self._check_open()
            k = self._n_idle if n is None else min(n, self._n_idle)
            for _ in range(k):
                self._evict_one()
        if k and self._tel.tracing:
            with self._tel.span("kvtriton.evict", blocks=k, bytes=k * self.block_bytes):
                pass
        return k

    # ------------------------------------------------------------------ checks and teardown
    def validate(self) -> None:
        """Check every invariant (O(pool size)); raises AssertionError naming the first broken one."""
        with self.lock:
            self._check_open()
            check_pool_invariants(self)

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
                for cache in self._caches.values():
                    cache._drop()
                self._caches.clear()
                self._closed = True
                self._kv_views = None
                try:
                    self.arena.release_all(self.pool_id)
                except ArenaClosedError:
                    pass  # the arena went first: nothing left to give back
                self._init_blocks()
                self.view = None  # so the arena's memory is freed once the allocator lets it go
        finally:
            moves.release_exclusive()

    def __repr__(self) -> str:
        return (f"CachePool({self.name!r}, spec={self.spec.name!r}, device={self.device}, "
                f"policy={self.policy_name!r}, blocks={self._n_used}/{self._capacity})")
