"""VirtualKVCache: one sequence's handle on its blocks in a CachePool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .. import ops
from ..errors import CacheReleasedError
from .checks import check_count, check_token_ids, is_int
from .hashing import hash_block_tokens

if TYPE_CHECKING:  # pragma: no cover
    from .pool import CachePool


class VirtualKVCache:
    """The block table of one sequence: ``seq_len`` tokens in ``block_ids`` (logical block ``i`` holds
    tokens ``[i*block_size, (i+1)*block_size)``). Created by :meth:`CachePool.request`.

    ``append`` allocates blocks as needed (copy-on-write of a shared last block), ``fork`` shares every
    block, ``release`` gives them back. After release every use raises CacheReleasedError.

    Threads: the pool is thread-safe; one cache is used by one thread at a time. Block ids
    (``block_ids``, ``block_table``, ``slot_mapping``) change when the pool shrinks or compacts:
    ``write_kv``/``read_kv`` hold the pool's moves lock from slot mapping to kernel, so a compaction
    cannot move the blocks between the two; take ids for your own kernels inside
    ``pool.stable_blocks()`` (see :mod:`kvtriton.memory.pool`).

    The cache owns its sequence state (block table, length, prefix hashes, token tail, released flag).
    The pool decides which blocks it gets and changes that state only through the methods below the
    line "called by the pool", always under the pool's lock; it (and its statistics) read ``_blocks``,
    ``_seq_len`` and ``_released`` there and never assign them. Invariant: ``len(_blocks) ==
    ceil(_seq_len / block_size)``.
    """

    __slots__ = ("pool", "cache_id", "_blocks", "_seq_len", "max_tokens", "num_cached_tokens", "_hashes",
                 "_tail", "_released", "__weakref__")

    def __init__(self, pool: "CachePool", cache_id: int, blocks: list[int], seq_len: int,
                 max_tokens: int | None, num_cached_tokens: int, hashes, tail):
        self.pool = pool
        self.cache_id = cache_id
        self._blocks = blocks
        self._seq_len = seq_len
        self.max_tokens = max_tokens
        self.num_cached_tokens = num_cached_tokens
        self._hashes = hashes
        self._tail = tail
        self._released = False

    def _alive(self) -> None:
        if self._released:
            closed = " (its pool was closed)" if self.pool.closed else ""
            raise CacheReleasedError(f"cache {self.cache_id} of pool {self.pool.name!r} was released{closed}")

    # ---------------------------------------------------------------- called by the pool, under its lock
    def _advance(self, n: int) -> None:
        """``n`` more tokens fit in the blocks held."""
        self._seq_len += n

    def _extend(self, n: int, new_blocks: list[int], cow: tuple[int, int] | None = None) -> None:
        """``n`` more tokens: ``new_blocks`` appended to the table; ``cow = (j, block)``: logical block
        ``j`` is replaced by its private copy ``block`` first."""
        if cow is not None:
            self._blocks[cow[0]] = cow[1]
        self._blocks.extend(new_blocks)
        self._seq_len += n

    def _extend_tokens(self, token_ids: list[int], block_size: int) -> list[tuple[int, object]]:
        """Extend the prefix hashing by ``token_ids`` (already counted in ``seq_len``); returns
        ``(logical block, hash)`` of the blocks they made full, for the prefix cache."""
        tail, hashes = self._tail, self._hashes
        tail.extend(token_ids)
        done = []
        while len(tail) >= block_size:
            h = hash_block_tokens(hashes[-1] if hashes else None, tail[:block_size])
            del tail[:block_size]
            hashes.append(h)
            done.append((len(hashes) - 1, h))
        return done

    def _remap(self, mapping: dict[int, int]) -> None:
        """Blocks moved by a shrink or compaction (``old -> new``). The table is replaced, never edited,
        so a reader holding the old list (``slot_mapping``) sees one consistent table."""
        self._blocks = [mapping.get(b, b) for b in self._blocks]

    def _child(self, cache_id: int) -> "VirtualKVCache":
        """A fork's state: copies of the table, hashes and tail (the pool counts the references)."""
        return VirtualKVCache(self.pool, cache_id, list(self._blocks), self._seq_len, self.max_tokens,
                              self.num_cached_tokens, None if self._hashes is None else list(self._hashes),
                              None if self._tail is None else list(self._tail))

    def _drop(self) -> list[int]:
        """Mark released; returns the blocks it held."""
        blocks = self._blocks
        self._released = True
        self._blocks = []
        return blocks

    # ---------------------------------------------------------------- state
    @property
    def released(self) -> bool:
        return self._released

    @property
    def seq_len(self) -> int:
        self._alive()
        return self._seq_len

    @property
    def num_blocks(self) -> int:
        self._alive()
        return len(self._blocks)

    @property
    def block_ids(self) -> list[int]:
        """A copy of the block table as Python ints (block ids index the pool's views)."""
        self._alive()
        return list(self._blocks)

    @property
    def block_table(self) -> torch.Tensor:
        """int32 ``[num_blocks]`` on the pool's device (valid until the next move: see ``pool.stable_blocks``)."""
        self._alive()
        return torch.tensor(self._blocks, dtype=torch.int32).to(self.pool.device)

    @property
    def block_hashes(self) -> list:
        """Hashes of the leading blocks known to the prefix cache's hashing (may be shorter)."""
        self._alive()
        return list(self._hashes or ())

    def slot_mapping(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """int64 ``[end - start]`` cache slots (``block * block_size + offset``) of tokens ``[start, end)``
        (``end`` defaults to ``seq_len``) on the pool's device (valid until the next move: see
        ``pool.stable_blocks``)."""
        self._alive()
        n = self._seq_len
        end = n if end is None else end
        if not (is_int(start) and is_int(end) and 0 <= start <= end <= n):
            raise IndexError(f"start and end must be ints with 0 <= start <= end <= seq_len={n}, got "
                             f"start={start!r}, end={end!r}")
        start, end = int(start), int(end)
        bs = self.pool.block_size
        blocks = self._blocks  # read once: a shrink replaces the list, never edits it
        pos = torch.arange(start, end, dtype=torch.int64)
        table = torch.tensor(blocks, dtype=torch.int64) if blocks else torch.zeros(0, dtype=torch.int64)
        slots = table[pos // bs] * bs + pos % bs if end > start else pos
        return slots.to(self.pool.device)

    # ---------------------------------------------------------------- operations
    def append(self, num_tokens: int = 1, token_ids: Sequence[int] | None = None) -> None:
        """Grow by ``num_tokens`` tokens (their K/V to be written by the caller, e.g. ``write_kv``).

        ``token_ids`` (only for caches requested with ``token_ids``) extend the prefix hashing: blocks
        that become full are registered in the prefix cache. Raises ValueError past ``max_tokens``,
        PoolExhaustedError when the pool is full; either way the cache is unchanged.
        """
        if type(num_tokens) is not int:
            num_tokens = check_count("num_tokens", num_tokens, 0)
        elif num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if token_ids is not None:
            # Checked in full before anything changes: a bad id must not leave the cache grown.
            token_ids = check_token_ids(token_ids)
            if len(token_ids) != num_tokens:
                raise ValueError(f"token_ids has {len(token_ids)} entries, num_tokens={num_tokens}")
        self.pool._append(self, num_tokens, token_ids)  # raises CacheReleasedError after release

    def fork(self) -> "VirtualKVCache":
        """A new cache sharing every block (reference counts +1); the first write to a shared block
        copies it (copy-on-write)."""
        return self.pool._fork(self)

    def release(self) -> None:
        """Same as ``pool.release(self)``."""
        self.pool.release(self)

    def write_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int) -> None:
        """Write ``key``/``value`` ``[num_tokens, H, D]`` for tokens ``[start, start + num_tokens)`` of
        ``layer`` with ``ops.append_kv`` (the tokens must already be in ``seq_len``).

        Safe against a concurrent ``shrink``/``compact``/``close`` of the pool: the slot mapping is
        taken and the kernel launched under the pool's moves lock (shared), so a move waits for the
        write, or the write for the move, and the bytes land in the block the cache holds."""
        if not isinstance(key, torch.Tensor) or key.dim() != 3:
            raise TypeError(f"key must be a tensor [num_tokens, H, D], got "
                            f"{tuple(key.shape) if isinstance(key, torch.Tensor) else type(key).__name__}")
        pool = self.pool
        moves = pool.moves_lock
        moves.acquire_shared()
        try:
            k_cache, v_cache = pool.kv(layer)
            slots = self.slot_mapping(start, start + key.shape[0] if is_int(start) else start)
            ops.append_kv(key, value, k_cache, v_cache, slots)
        finally:
            moves.release_shared()

    def read_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of ``(key, value)`` ``[seq_len, H, D]`` of ``layer`` (plain indexing; for checks), taken
        under the pool's moves lock like :meth:`write_kv`."""
        pool = self.pool
        moves = pool.moves_lock
        moves.acquire_shared()
        try:
            k_cache, v_cache = pool.kv(layer)
            slots = self.slot_mapping()
            bs = pool.block_size
            blk, off = slots // bs, slots % bs
            return k_cache[blk, off].clone(), v_cache[blk, off].clone()
        finally:
            moves.release_shared()

    def __len__(self) -> int:
        return self.seq_len

    def __repr__(self) -> str:
        state = "released" if self._released else f"seq_len={self._seq_len}, blocks={len(self._blocks)}"
        return f"VirtualKVCache(pool={self.pool.name!r}, id={self.cache_id}, {state})"
