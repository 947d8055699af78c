"""Shared helpers of the memory-manager tests."""

from __future__ import annotations

import numpy as np
import torch

from kvtriton import ModelSpec

# 1 KiB blocks (2 layers x K/V x 4 tokens x 2 heads x 8 x fp32); 4 per 4 KiB chunk.
SMALL = ModelSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_size=4, name="small")
# 768-byte blocks: they straddle 4 KiB chunk boundaries.
ODD = ModelSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_size=3, name="odd")
# 8 KiB blocks: each spans two 4 KiB chunks.
BIG = ModelSpec(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, block_size=8, name="big")


def snapshot(pool) -> dict:
    """Everything that must be unchanged after a failed operation."""
    s = pool.stats()
    for k in list(s):
        if k.startswith("alloc_latency") or k == "exhausted":
            del s[k]
    return {
        "stats": s, "free": list(pool._free), "ref": list(pool._ref), "hash": list(pool._hash),
        "cached": dict(pool._cached), "usable": pool._usable.copy(), "owner": pool.arena.owner == pool.pool_id,  # other pools may give back empty chunks
        "caches": {cid: (list(c._blocks), c._seq_len) for cid, c in pool._caches.items()},
        "policy": (len(pool.policy), pool.policy.num_evictable),
    }


def assert_same(a: dict, b: dict) -> None:
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def fill_random(cache, start: int, end: int, gen: torch.Generator | None = None):
    """Write random K/V for tokens [start, end) of every layer; return them as [L, 2, n, H, D]."""
    spec = cache.pool.spec
    n = end - start
    data = torch.randn(spec.num_layers, 2, n, spec.num_kv_heads, spec.head_dim, generator=gen)
    for layer in range(spec.num_layers):
        cache.write_kv(layer, data[layer, 0], data[layer, 1], start)
    return data


def read_all(cache):
    """K/V of every layer as [L, 2, seq_len, H, D]."""
    spec = cache.pool.spec
    out = []
    for layer in range(spec.num_layers):
        k, v = cache.read_kv(layer)
        out.append(torch.stack([k, v]))
    return torch.stack(out) if out else None


def brute_stats(pool) -> dict:
    """The figures of ``pool.stats()`` that follow from the pool's state, recomputed from scratch
    through the public views of its caches (the algorithm ``stats()`` used before it kept them
    incrementally): blocks by state from the holders, fragmentation from every cache's blocks."""
    bs, B = pool.block_size, pool.block_bytes
    caches = list(pool._caches.values())
    full: set[int] = set()
    partial: dict[int, int] = {}
    held: set[int] = set(pool._external)
    tokens = 0
    for c in caches:
        n, blocks = c.seq_len, c.block_ids
        tokens += n
        held.update(blocks)
        k = -(-n // bs)
        if not k:
            continue
        full.update(blocks[:k - 1])
        b, f = blocks[k - 1], n - (k - 1) * bs
        if f == bs:
            full.add(b)
        elif f > partial.get(b, 0):
            partial[b] = f
    part = [f for b, f in partial.items() if b not in full]
    slots = (len(full) + len(part)) * bs
    cap = int(pool._usable.sum())
    used = len(held)
    idle = len(set(pool._cached.values()) - held)
    free = cap - used - idle
    chunks = int((pool.arena.owner == pool.pool_id).sum())
    held_bytes = chunks * pool.arena.chunk_bytes
    ratio = lambda a, b: float(a) / float(b) if b else 0.0  # noqa: E731
    return {
        "capacity_blocks": cap, "used_blocks": used, "cached_blocks": idle, "free_blocks": free,
        "capacity_bytes": cap * B, "used_bytes": used * B, "cached_bytes": idle * B, "free_bytes": free * B,
        "block_bytes": B, "block_size": bs, "utilization": ratio(used, cap),
        "internal_fragmentation": ratio(slots - len(full) * bs - sum(part), slots),
        "external_fragmentation": 1.0 - ratio(used * B, held_bytes) if held_bytes else 0.0,
        "chunks_held": chunks, "held_bytes": held_bytes, "live_caches": len(caches), "live_tokens": tokens,
        "prefix_cache_entries": len(pool._cached),
    }
