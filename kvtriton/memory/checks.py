"""Checks of the memory manager: arguments (integers are ints, numpy integers too, never bools, and
every error names the argument and the allowed range; ``request``'s arguments as a whole), and the
invariants of a pool (``CachePool.validate``)."""

from __future__ import annotations

import numpy as np

from ..checks import check_int, is_int


def check_count(name: str, v, minimum: int = 0, exc=ValueError) -> int:
    """``v`` as an int ``>= minimum``; else ``exc`` naming ``name`` and the range."""
    return check_int(name, v, minimum, exc=exc)


def check_index(name: str, v, lo: int, hi: int, exc=IndexError) -> int:
    """``v`` as an int in ``[lo, hi)``; else ``exc`` naming ``name`` and the range."""
    if not is_int(v) or not lo <= v < hi:
        raise exc(f"{name} must be an int in [{lo}, {hi}), got {v!r}")
    return int(v)


def check_token_ids(token_ids, name: str = "token_ids") -> list[int]:
    """``token_ids`` as a list of ints; ValueError naming the first entry that is not an integer."""
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {type(token_ids).__name__}")
    toks = list(token_ids)
    if all(type(t) is int for t in toks):  # the common case, one C-speed pass
        return toks
    for i, t in enumerate(toks):
        if not is_int(t):
            raise ValueError(f"{name}[{i}] must be an int (a token id), got {t!r}")
    return [int(t) for t in toks]


def check_block_hashes(block_hashes, name: str = "block_hashes") -> list:
    """``block_hashes`` as a list of distinct hashable keys other than ``None`` (the pool's "no hash"
    marker); ValueError naming the first bad index."""
    if isinstance(block_hashes, (str, bytes)) or not hasattr(block_hashes, "__iter__"):
        raise ValueError(f"{name} must be a sequence of hashable keys (one per block), got "
                         f"{type(block_hashes).__name__}")
    hashes = list(block_hashes)
    try:
        distinct = len(set(hashes)) == len(hashes)
    except TypeError:
        distinct = False
    if distinct and None not in hashes:
        return hashes
    seen: dict = {}
    for i, h in enumerate(hashes):
        if h is None:
            raise ValueError(f"{name}[{i}] is None; None marks a block without a hash, so every block "
                             f"hash must be a hashable key other than None")
        try:
            first = seen.setdefault(h, i)
        except TypeError:
            raise ValueError(f"{name}[{i}] must be hashable, got {type(h).__name__} {h!r}") from None
        if first != i:
            raise ValueError(f"{name}[{i}] repeats {name}[{first}]; block hashes are prefix-chained, so "
                             f"they must be distinct")
    return hashes  # pragma: no cover - one of the checks above fires


def check_request_args(num_tokens, max_tokens, token_ids, block_hashes, block_size: int):
    """The arguments of ``CachePool.request`` checked: ``(num_tokens, max_tokens, hashes, tail)``, the
    block hashes (from ``token_ids`` vLLM-style, or ``block_hashes`` as given; None without either) and
    the token ids past the last full block (None without ``token_ids``). ValueError names the bad one."""
    from .hashing import block_hashes_from_tokens  # here: hashing imports this module

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
    if token_ids is not None:
        hashes = block_hashes_from_tokens(token_ids, block_size)
        return num_tokens, max_tokens, hashes, token_ids[len(hashes) * block_size:]
    if block_hashes is not None:
        hashes = check_block_hashes(block_hashes)
        nblocks = -(-num_tokens // block_size)
        if len(hashes) > nblocks:
            raise ValueError(f"block_hashes has {len(hashes)} entries but num_tokens={num_tokens} "
                             f"spans only {nblocks} blocks of {block_size}")
        return num_tokens, max_tokens, hashes, None
    return num_tokens, max_tokens, None, None


def check_pool_invariants(pool) -> None:
    """Every invariant of a ``CachePool`` (its lock held): AssertionError naming the first broken one.
    O(pool size); the incremental statistics are compared with a recomputation from the caches."""
    usable = set(np.flatnonzero(pool._usable).tolist())
    assert len(usable) == pool._capacity, "capacity != usable blocks"
    free, ref, hashes = pool._free, pool._ref, pool._hash
    assert len(set(free)) == len(free), "duplicate block on the free list"
    assert set(free) <= usable, "free list holds an unusable block"
    holders = [0] * pool.num_blocks
    bs = pool.block_size
    for c in pool._caches.values():
        assert len(set(c._blocks)) == len(c._blocks), f"cache {c.cache_id} holds a block twice"
        assert len(c._blocks) == -(-c._seq_len // bs), f"cache {c.cache_id}: blocks != ceil(seq_len / block_size)"
        for b in c._blocks:
            holders[b] += 1
    for b in pool._external:
        holders[b] += 1
    used = idle = 0
    for b in usable:
        assert ref[b] == holders[b], f"block {b}: ref {ref[b]} != {holders[b]} holders"
        if ref[b] > 0:
            used += 1
            assert b not in free, f"used block {b} is on the free list"
        elif hashes[b] is not None:
            idle += 1
            assert b not in free, f"cached block {b} is on the free list"
    assert all(holders[b] == 0 and hashes[b] is None for b in range(pool.num_blocks)
               if b not in usable), "an unusable block is held or cached"
    assert used == pool._n_used, f"used count {pool._n_used} != {used}"
    assert idle == pool._n_idle, f"cached count {pool._n_idle} != {idle}"
    assert len(free) + used + idle == pool._capacity, "free + used + cached != capacity"
    assert None not in pool._cached, "None (the no-hash marker) is a prefix-cache key"
    assert len(pool._cached) == sum(h is not None for h in hashes), "hash map size"
    for h, b in pool._cached.items():
        assert hashes[b] == h, f"hash map points {h!r} at block {b} holding {hashes[b]!r}"
    assert len(pool.policy) == len(pool._cached), "policy residents != cached blocks"
    assert pool.policy.num_evictable == pool._n_idle, "policy evictable != cached unreferenced"
    assert pool.arena.count_of(pool.pool_id) == pool._chunks_held, "chunks held"
    assert pool._live_tokens == sum(c._seq_len for c in pool._caches.values()), "live tokens"
    assert pool._cache_refs == sum(len(c._blocks) for c in pool._caches.values()), "cache table entries"
    pool._tails.check(pool._caches.values(), ref, hashes)
