"""Elastic capacity of a :class:`~kvtriton.memory.pool.CachePool`: claiming arena chunks, giving them
back, and moving live blocks out of the chunks given back (shrink, compaction).

``ElasticCapacity`` is the part of ``CachePool`` that changes which blocks are usable. It plans with
:mod:`kvtriton.memory.chunk_planner` (pure numpy: which chunks, which blocks move where) and applies
the plan to the pool's state under the pool's lock (and, for moves, its exclusive moves lock). The
host work of a shrink or compaction is one vectorised planning pass plus Python work proportional to
the blocks it moves and evicts.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .. import ops
from ..errors import ArenaClosedError, PoolExhaustedError
from .checks import check_count
from .chunk_planner import ReleasePlan, empty_chunks, plan_growth, plan_moves


class ElasticCapacity:
    """Growth, shrinking and compaction of a pool (mixed into :class:`CachePool`, whose state it uses)."""

    # ------------------------------------------------------------------ growth
    def grow(self, num_chunks: int | None = None, *, num_blocks: int | None = None) -> int:
        """Claim ``num_chunks`` chunks (rounded up to whole blocks where a block spans several chunks),
        or enough chunks for ``num_blocks`` more usable blocks, from the arena now; returns the chunks
        claimed (fewer where the arena or ``max_chunks`` runs out)."""
        if (num_chunks is None) == (num_blocks is None):
            raise ValueError("give exactly one of num_chunks or num_blocks")
        if num_chunks is not None:
            num_chunks = check_count("num_chunks", num_chunks, 0)
        else:
            num_blocks = check_count("num_blocks", num_blocks, 0)
        with self.lock:
            self._check_open()
            if num_chunks is not None:
                return self._claim_chunks(num_chunks)
            return len(self._grow_blocks(num_blocks, min_chunks=0))

    def _claim_initial(self, k: int) -> None:
        """Claim the pool's ``initial_chunks``; all or nothing (ValueError, the pool closed)."""
        with self.lock:
            got = self._claim_chunks(k)
            if got < k:
                self._ungrow_all()
                self._closed = True
                raise ValueError(f"initial_chunks={k} but only {got} chunks could be claimed from the "
                                 f"arena of {self.arena.num_chunks} chunks")

    def _claim_chunks(self, k: int) -> int:
        """Claim ``k`` more chunks (for ``initial_chunks``); returns the number claimed."""
        before = self._chunks_held
        unit = self.geometry.unit
        if unit is not None:  # whole tiling units only
            k = -(-k // unit[0]) * unit[0]
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
        arena = self.arena
        # The arena's lock is held across choosing free chunks and claiming them, so no other pool
        # takes them in between.
        with arena.lock:
            if arena.closed:
                raise ArenaClosedError(f"the arena of {arena.device} is closed")
            if arena.n_free == 0:
                return []
            claimed, newly = plan_growth(self.geometry, arena.owner, self.pool_id, self._usable, need,
                                         min_chunks, limit)
            if claimed:
                arena.claim(claimed, self.pool_id)
        if claimed:
            self._usable[newly] = True
            newly.sort(reverse=True)  # low ids are popped first
            self._free[:0] = newly    # behind recently freed blocks, which are reused first
            self._capacity += len(newly)
            self._chunks_held += len(claimed)
            self._counters["grows"] += 1
            self._counters["chunks_claimed"] += len(claimed)
            if self._tel.tracing:
                with self._tel.span("kvtriton.grow", chunks=len(claimed), blocks=len(newly),
                                    bytes=len(claimed) * arena.chunk_bytes):
                    pass
        return claimed

    def _ungrow(self, chunks: list, undo: bool = True) -> None:
        """Give back ``chunks`` (all their blocks are free); ``undo``: they were just claimed by a growth
        that is being rolled back, so its counts are rolled back too."""
        lost = self.geometry.blocks_of(chunks)
        lost = lost[self._usable[lost]]
        mask = np.zeros(self.num_blocks, dtype=bool)
        mask[lost] = True
        _, self._free = plan_moves(self._free, mask, [])
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

    # ------------------------------------------------------------------ giving chunks back
    def release_free_chunks(self) -> int:
        """Give back every held chunk whose usable blocks are all free (no moves); returns the count."""
        with self.lock:
            self._check_open()
            used, idle, _ = self._block_masks()
            empty = empty_chunks(self.geometry, self.arena.chunks_of(self.pool_id), self._usable, used | idle)
            if empty:
                self._ungrow(empty, undo=False)
                self._counters["chunks_returned"] += len(empty)
            return len(empty)

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
        num_chunks = check_count("num_chunks", num_chunks, 0)
        moves = self._moves
        moves.acquire_exclusive("shrink")  # before the pool lock: see the pool's locking order
        try:
            with self.lock:
                self._check_open()
                return self._shrink(num_chunks, evict) if num_chunks else 0
        finally:
            moves.release_exclusive()

    def compact(self, *, evict: bool = False) -> int:
        """Pack live blocks into as few chunks as they allow and give the rest back (see :meth:`shrink`,
        also for how it waits for users of block ids); returns the chunks given back."""
        moves = self._moves
        moves.acquire_exclusive("compact")  # before the pool lock: see the pool's locking order
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
        live = self._n_used + (0 if evict else self._n_idle)
        per_chunk = max(1.0, self.arena.chunk_bytes / self.block_bytes)
        k = self._chunks_held - int(np.ceil(live / per_chunk))
        if k <= 0:
            return 0
        plan = self._release_plan()
        k = plan.max_feasible(k, evict)
        return self._give_back(plan, k, evict) if k > 0 else 0

    def _shrink(self, num_chunks: int, evict: bool) -> int:
        """Give back ``num_chunks`` chunks (see :meth:`shrink`); raises (changing nothing but the
        ``exhausted`` count) when that is not possible."""
        plan = self._release_plan()
        if num_chunks > plan.held.size:
            raise ValueError(f"num_chunks must be <= the {plan.held.size} chunks pool {self.name!r} holds, "
                             f"got {num_chunks}")
        if plan.candidates < num_chunks:
            raise ValueError(f"num_chunks={num_chunks} but only {plan.candidates} chunks of pool {self.name!r} "
                             f"hold no blocks from allocate_blocks")
        if not plan.feasible(num_chunks, evict):
            used, idle, free_left, idle_left = plan.counts(num_chunks)
            self._counters["exhausted"] += 1
            raise PoolExhaustedError(
                self.name, used, free_left, idle_left if evict else 0,
                message=f"pool {self.name!r} cannot shrink by {num_chunks} chunks: {used} used "
                        f"and {idle} cached blocks live there, {free_left} blocks free and "
                        f"{idle_left} evictable in the other chunks (evict={evict})")
        return self._give_back(plan, num_chunks, evict)

    def _block_masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """bool ``[num_blocks]`` masks ``(used, idle, pinned)`` from the caches' tables, the prefix cache
        and the blocks of ``allocate_blocks``: numpy work over the blocks, Python work over what is held."""
        n = self.num_blocks
        used, idle, pinned = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        if self._caches:
            held = itertools.chain.from_iterable(c._blocks for c in self._caches.values())
            used[np.fromiter(held, dtype=np.int64)] = True
        if self._external:
            pinned[np.fromiter(self._external, dtype=np.int64, count=len(self._external))] = True
            used |= pinned
        if self._cached:
            idle[np.fromiter(self._cached.values(), dtype=np.int64, count=len(self._cached))] = True
            idle &= ~used
        return used, idle, pinned

    def _release_plan(self) -> ReleasePlan:
        used, idle, pinned = self._block_masks()
        return ReleasePlan(self.geometry, self.arena.chunks_of(self.pool_id), self._usable, used, idle, pinned,
                           len(self._free), self._n_idle)

    def _give_back(self, plan: ReleasePlan, k: int, evict: bool) -> int:
        """Apply ``plan`` for its first ``k`` chunks (feasible): evict what must go, move the live blocks
        out, and return the chunks to the arena."""
        chosen, lost = plan.chosen(k), plan.lost(k)
        used_lost = np.flatnonzero(lost & plan.used).tolist()
        idle_lost = set(np.flatnonzero(lost & plan.idle).tolist())
        rem_free = plan.counts(k)[2]
        evicted = 0
        while rem_free < len(used_lost) + len(idle_lost) and self._n_idle > 0:
            b = self._evict_one()
            evicted += 1
            if b in idle_lost:
                idle_lost.discard(b)
            else:
                rem_free += 1
        src = used_lost + sorted(idle_lost)
        dst, self._free = plan_moves(self._free, lost, src)
        if src:
            self._move_blocks(src, dst)
        lost_blocks = np.flatnonzero(lost)
        self._usable[lost_blocks] = False
        self._capacity -= lost_blocks.size
        self.arena.give_back(chosen, self.pool_id)
        self._chunks_held -= k
        self._counters["shrinks"] += 1
        self._counters["chunks_returned"] += k
        self._counters["blocks_moved"] += len(src)
        if self._tel.tracing:
            with self._tel.span("kvtriton.shrink", chunks=k, blocks=len(src), evicted=evicted,
                                bytes=k * self.arena.chunk_bytes):
                pass
        return k

    def _move_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy blocks ``src`` to the free blocks ``dst`` in one kernel, then move their reference counts,
        hashes, prefix-cache entries and fragmentation records, and rewrite the tables that hold them."""
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
        ref, hashes, cached = self._ref, self._hash, self._cached
        for s, d in mapping.items():
            ref[d], hashes[d] = ref[s], hashes[s]
            if hashes[d] is not None:
                cached[hashes[d]] = d
            ref[s], hashes[s] = 0, None
        self._tails.remap(mapping)
        moved = mapping.keys()
        for cache in self._caches.values():
            if not moved.isdisjoint(cache._blocks):
                cache._remap(mapping)
