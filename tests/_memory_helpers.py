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
