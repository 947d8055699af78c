"""Chunk geometry and capacity plans of one pool over an arena: pure numpy, no locks, no pool.

A pool's block ``i`` is the byte range ``[i*B, (i+1)*B)`` of the arena and chunk ``c`` the range
``[c*C, (c+1)*C)``, so block ``i`` overlaps chunks ``first_chunk[i] .. last_chunk[i]``; it is *usable*
by the pool when the pool holds every one of them. Where ``B`` and ``C`` divide each other they tile
in units of ``unit = (chunks, blocks)``; otherwise (blocks straddling chunk boundaries) growth claims
the chunks under chosen blocks, cheapest first.

The functions here read the arena's ownership table and the pool's per-block state arrays and return
what to claim, give back and move; the pool applies the plans under its locks (``kvtriton.memory.pool``).
Every plan is one vectorised pass over the blocks, so planning costs numpy time proportional to the
pool's size, and Python time proportional to what is claimed or moved.
"""

from __future__ import annotations

import numpy as np

from .arena import FREE


def ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The integers of the closed ranges ``[lo[i], hi[i]]`` concatenated (empty where ``hi < lo``)."""
    counts = np.maximum(hi - lo + 1, 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo, counts)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return starts + offsets


class ChunkGeometry:
    """Which chunks each block overlaps, for ``num_blocks`` blocks of ``block_bytes`` over chunks of
    ``chunk_bytes``. ``first_chunk``/``last_chunk``: int64 ``[num_blocks]``."""

    def __init__(self, num_blocks: int, block_bytes: int, chunk_bytes: int):
        self.num_blocks, self.block_bytes, self.chunk_bytes = num_blocks, block_bytes, chunk_bytes
        B, C = block_bytes, chunk_bytes
        idx = np.arange(num_blocks, dtype=np.int64)
        self.first_chunk = (idx * B) // C
        self.last_chunk = ((idx + 1) * B - 1) // C
        # (chunks, blocks) per tiling unit where blocks and chunks tile each other, else None.
        self.unit = (1, C // B) if C % B == 0 else (B // C, 1) if B % C == 0 else None

    def block_range(self, chunk: int) -> tuple[int, int]:
        """``(lo, hi)``: the blocks overlapping ``chunk`` are ``lo..hi`` (empty when ``hi < lo``)."""
        C, B = self.chunk_bytes, self.block_bytes
        return (chunk * C) // B, min(self.num_blocks - 1, ((chunk + 1) * C - 1) // B)

    def blocks_of(self, chunks) -> np.ndarray:
        """Blocks overlapping any chunk of ``chunks``: int64, ascending, distinct."""
        c = np.asarray(chunks, dtype=np.int64)
        if c.size == 0:
            return np.zeros(0, dtype=np.int64)
        C, B = self.chunk_bytes, self.block_bytes
        lo = (c * C) // B
        hi = np.minimum(self.num_blocks - 1, ((c + 1) * C - 1) // B)
        return np.unique(ranges(lo, hi))

    def chunk_pairs(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(chunk, position)`` pairs: every chunk each of ``blocks`` overlaps, with the position in
        ``blocks`` of its block; grouped by block, in the order of ``blocks``."""
        fc, lc = self.first_chunk[blocks], self.last_chunk[blocks]
        counts = lc - fc + 1
        pos = np.repeat(np.arange(blocks.size, dtype=np.int64), counts)
        return ranges(fc, lc), pos


# --------------------------------------------------------------------------------------------- growth
def plan_growth(geom: ChunkGeometry, owner: np.ndarray, me: int, usable: np.ndarray, need: int,
                min_chunks: int, limit: int | None) -> tuple[list[int], list[int]]:
    """Free chunks for pool ``me`` to claim so that ``need`` more blocks become usable (and at least
    ``min_chunks`` chunks are claimed where the arena allows), at most ``limit`` chunks (None: no
    bound). Returns ``(chunks, newly_usable_blocks)``; ``owner`` and ``usable`` are not changed."""
    if geom.unit is not None:
        return _growth_aligned(geom, owner, me, need, min_chunks, limit)
    return _growth_general(geom, owner, me, usable, need, min_chunks, limit)


def _growth_aligned(geom, owner, me, need, min_chunks, limit):
    """Blocks and chunks tile each other (``C % B == 0`` or ``B % C == 0``): units of ``uc`` chunks
    hold exactly ``ub`` blocks, so whole units are claimed, first ones first."""
    uc, ub = geom.unit
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
    blocks = (chosen[:, None] * ub + np.arange(ub)).ravel()
    blocks = blocks[blocks < geom.num_blocks]
    return chunks.tolist(), blocks.tolist()


def _growth_general(geom, owner, me, usable, need, min_chunks, limit):
    """Any block and chunk sizes: claim the chunks under chosen blocks, cheapest first (fewest free
    chunks to claim), counting the blocks that every claimed run makes usable."""
    fc, lc = geom.first_chunk, geom.last_chunk
    not_ok = np.concatenate(([0], np.cumsum((owner != FREE) & (owner != me))))
    is_free = np.concatenate(([0], np.cumsum(owner == FREE)))
    feasible = (not_ok[lc + 1] - not_ok[fc]) == 0
    cost = is_free[lc + 1] - is_free[fc]
    feasible &= cost > 0
    claimed: list[int] = []
    taken: set[int] = set()        # chunks this plan claims (owner still says FREE)
    newly: list[int] = []
    made: set[int] = set()
    for b in _cheapest_first(feasible, cost):
        if len(newly) >= need and len(claimed) >= min_chunks:
            break
        if limit is not None and len(claimed) >= limit:
            break
        new_chunks = [c for c in range(int(fc[b]), int(lc[b]) + 1) if owner[c] == FREE and c not in taken]
        if not new_chunks or (limit is not None and len(claimed) + len(new_chunks) > limit):
            continue
        claimed.extend(new_chunks)
        taken.update(new_chunks)
        lo = geom.block_range(new_chunks[0])[0]
        hi = geom.block_range(new_chunks[-1])[1]
        for bb in range(lo, hi + 1):
            if usable[bb] or bb in made:
                continue
            if all(owner[c] == me or c in taken for c in range(int(fc[bb]), int(lc[bb]) + 1)):
                made.add(bb)
                newly.append(bb)
    return claimed, newly


def _cheapest_first(mask, cost):
    """Indices where ``mask`` holds, by increasing ``cost`` then index, produced lazily (a growth
    usually stops after a few)."""
    for c in np.flatnonzero(np.bincount(cost[mask])).tolist():
        idx = np.flatnonzero(mask & (cost == c))
        for i in range(0, idx.size, 64):
            yield from idx[i:i + 64].tolist()


# --------------------------------------------------------------------------------- shrink and compaction
class ReleasePlan:
    """Which held chunks to give back first, and what giving back the first ``k`` of them costs.

    Built from the pool's state in one vectorised pass: ``held`` (int64, the chunks the pool holds),
    per-block bool ``[num_blocks]`` masks ``usable``, ``used`` (reference count > 0), ``idle`` (cached,
    unreferenced) and ``pinned`` (held by ``allocate_blocks``: never moved), and the pool's counts of
    free and idle blocks. Chunks holding a pinned block are never chosen; the others go in order of
    (used blocks, idle blocks, -chunk): the emptiest first, the highest id first among equals.

    Giving back the first ``k`` chunks loses every usable block overlapping one of them; its used blocks
    must move into free blocks of the other chunks, its idle ones move too or are evicted. The counts
    for every ``k`` come from one cumulative sum, so the largest feasible ``k`` (``max_feasible``) needs
    no search.
    """

    def __init__(self, geom: ChunkGeometry, held: np.ndarray, usable: np.ndarray, used: np.ndarray,
                 idle: np.ndarray, pinned: np.ndarray, n_free: int, n_idle: int):
        self.held = held
        self.n_free, self.n_idle = n_free, n_idle
        self.used, self.idle = used, idle
        n_chunks = int(held.max()) + 1 if held.size else 0
        blocks = np.flatnonzero(usable)
        chunk, pos = geom.chunk_pairs(blocks)
        per_chunk = lambda w: np.bincount(chunk, weights=w[blocks][pos], minlength=n_chunks)  # noqa: E731
        used_n, idle_n, pin_n = per_chunk(used), per_chunk(idle), per_chunk(pinned)
        cand = held[pin_n[held] == 0]
        order = np.lexsort((-cand, idle_n[cand], used_n[cand]))
        self.order = cand[order]                         # candidate chunks, first given back first
        rank = np.full(max(n_chunks, 1), np.iinfo(np.int64).max, dtype=np.int64)
        rank[self.order] = np.arange(self.order.size)
        # A block is lost once the first chosen chunk it overlaps is given back.
        # Pairs are grouped by block and every block overlaps at least one chunk.
        first = (np.minimum.reduceat(rank[chunk], np.searchsorted(pos, np.arange(blocks.size)))
                 if blocks.size else np.zeros(0, dtype=np.int64))
        self.lost_from = np.full(usable.size, np.iinfo(np.int64).max, dtype=np.int64)
        self.lost_from[blocks] = first                   # lost when k > lost_from
        k1 = self.order.size + 1

        def cum(mask):
            r = first[mask[blocks] & (first < k1)]
            return np.concatenate(([0], np.cumsum(np.bincount(r, minlength=k1))[:-1]))

        self.used_lost, self.idle_lost = cum(used), cum(idle)   # [k]: for the first k chunks
        self.free_lost = cum(usable & ~used & ~idle)

    @property
    def candidates(self) -> int:
        return int(self.order.size)

    def counts(self, k: int) -> tuple[int, int, int, int]:
        """``(used_lost, idle_lost, free_left, idle_left)`` when the first ``k`` chunks go."""
        u, i = int(self.used_lost[k]), int(self.idle_lost[k])
        return u, i, self.n_free - int(self.free_lost[k]), self.n_idle - i

    def feasible(self, k, evict: bool):
        """Whether the first ``k`` chunks can go (``k`` an int or an array of ints): the used blocks
        there fit in the free blocks left (plus the idle ones elsewhere, evicted, with ``evict``); without
        ``evict`` the idle blocks there must fit as well."""
        used, idle = self.used_lost[k], self.idle_lost[k]
        free_left = self.n_free - self.free_lost[k]
        idle_left = self.n_idle - idle
        ok = used <= free_left + (idle_left if evict else 0)
        if not evict:
            ok = ok & (used + idle <= free_left)
        return ok

    def max_feasible(self, k_max: int, evict: bool) -> int:
        """The largest ``k <= k_max`` such that giving back the first ``k`` chunks is feasible
        (feasibility only falls as ``k`` grows: more blocks to move, fewer free blocks to take them)."""
        k_max = min(k_max, self.candidates)
        if k_max <= 0:
            return 0
        ok = self.feasible(np.arange(1, k_max + 1), evict)
        return k_max if ok.all() else int(np.argmin(ok))

    def chosen(self, k: int) -> np.ndarray:
        return self.order[:k]

    def lost(self, k: int) -> np.ndarray:
        """bool ``[num_blocks]``: the usable blocks lost when the first ``k`` chunks go."""
        return self.lost_from < k


def plan_moves(free_list: list[int], lost: np.ndarray, src: list[int]) -> tuple[list[int], list[int]]:
    """Destinations for the blocks ``src`` leaving lost chunks: the last ``len(src)`` entries of the free
    list that are not lost (the free list is a stack, so those are taken first). Returns
    ``(dst, free_list_left)``."""
    f = np.asarray(free_list, dtype=np.int64)
    f = f[~lost[f]] if f.size else f
    cut = f.size - len(src)
    return f[cut:].tolist(), f[:cut].tolist()


def empty_chunks(geom: ChunkGeometry, held: np.ndarray, usable: np.ndarray, live: np.ndarray) -> list[int]:
    """The chunks of ``held`` that no ``live`` (used or cached) usable block overlaps: int list."""
    if held.size == 0:
        return []
    blocks = np.flatnonzero(usable & live)
    chunk, _ = geom.chunk_pairs(blocks)
    busy = np.zeros(int(held.max()) + 1, dtype=bool)
    busy[chunk[chunk < busy.size]] = True
    return held[~busy[held]].tolist()
