"""Random interleavings of request, append, fork, release, evict, shrink, grow and compact on two pools
sharing one arena (one with blocks straddling chunk boundaries, one with blocks spanning two chunks).

After every step: each pool's invariants (``validate``: free + used + cached == capacity, reference
counts equal holders, the prefix cache and the policy agree), the arena's chunk accounting, and every
live token's K/V bytes, written with ``append_kv`` through the pool's views, read back unchanged.
Prompt tokens carry K/V that depend only on their prefix, so a prefix-cache hit must read back exactly
what the first writer wrote, also after the block was moved by shrink or compaction.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule)

from _memory_helpers import assert_same, read_all, snapshot
from kvtriton import GPUMemoryAllocator, ModelSpec, PoolExhaustedError
from kvtriton.ops import backend

# 192-byte blocks in 256-byte chunks (straddling) and 512-byte blocks (two chunks each).
SPECS = {
    "a": ModelSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, block_size=3, name="a"),
    "b": ModelSpec(num_layers=1, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_size=4, name="b"),
}
# Every online policy of the registry (Belady needs the future access sequence).
POLICIES = ["lru", "fifo", "lfu", "gdsf", "arc", "s3fifo", "sieve"]
BASES = [[7] * 40, list(range(40)), [3, 1, 4, 1, 5, 9, 2, 6] * 5]


def prefix_kv(spec, tokens, p):
    """K/V ``[L, 2, H, D]`` of prompt token ``p``: a function of ``tokens[:p+1]`` only."""
    g = torch.Generator().manual_seed(hash((spec.name, tuple(tokens[: p + 1]))) & 0x7FFFFFFF)
    return torch.randn(spec.num_layers, 2, spec.num_kv_heads, spec.head_dim, generator=g)


def write(cache, start, data):
    """Write ``data`` ``[L, 2, n, H, D]`` for tokens ``[start, start + n)``."""
    for layer in range(data.shape[0]):
        cache.write_kv(layer, data[layer, 0], data[layer, 1], start)


class PoolMachine(RuleBasedStateMachine):
    caches = Bundle("caches")

    def __init__(self):
        super().__init__()
        self._ctx = backend("reference")
        self._ctx.__enter__()
        self.alloc = GPUMemoryAllocator(devices=["cpu"], budget_bytes=24 * 256, chunk_bytes=256).start()
        self.pools = {}
        self.expected = {}   # cache -> [L, 2, seq_len, H, D]
        self.gen = torch.Generator().manual_seed(0)

    @initialize(policies=st.tuples(st.sampled_from(POLICIES), st.sampled_from(POLICIES)))
    def create_pools(self, policies):
        for (k, spec), policy in zip(SPECS.items(), policies):
            self.pools[k] = self.alloc.create_pool(k, spec, policy=policy)

    def teardown(self):
        self.alloc.close()
        self._ctx.__exit__(None, None, None)

    def _fail_unchanged(self, pool, fn):
        before = snapshot(pool)
        with pytest.raises((PoolExhaustedError, ValueError)):
            fn()
        assert_same(before, snapshot(pool))

    @rule(target=caches, which=st.sampled_from("ab"), base=st.integers(0, 2), n=st.integers(0, 20),
          hashed=st.booleans())
    def request(self, which, base, n, hashed):
        pool, spec = self.pools[which], SPECS[which]
        toks = BASES[base][:n]
        try:
            before = snapshot(pool)
            cache = pool.request(token_ids=toks) if hashed else pool.request(n)
        except PoolExhaustedError:
            assert_same(before, snapshot(pool))
            return None
        data = (torch.stack([prefix_kv(spec, toks, p) for p in range(n)], 2) if n else
                torch.zeros(spec.num_layers, 2, 0, spec.num_kv_heads, spec.head_dim))
        if hashed:
            assert cache.num_cached_tokens % spec.block_size == 0 or cache.num_cached_tokens == n
            # Prefill: only the tokens the prefix cache did not provide are computed and written.
            k = cache.num_cached_tokens
            write(cache, k, data[:, :, k:])
        else:
            write(cache, 0, data)
        self.expected[cache] = data
        return cache

    @rule(cache=caches, n=st.integers(1, 7))
    def append(self, cache, n):
        if cache is None or cache.released:
            return
        pool, spec = cache.pool, cache.pool.spec
        try:
            before = snapshot(pool)
            start = cache.seq_len
            cache.append(n)
        except PoolExhaustedError:
            assert_same(before, snapshot(pool))
            return
        data = torch.randn(spec.num_layers, 2, n, spec.num_kv_heads, spec.head_dim, generator=self.gen)
        write(cache, start, data)
        self.expected[cache] = torch.cat([self.expected[cache], data], 2)

    @rule(target=caches, cache=caches)
    def fork(self, cache):
        if cache is None or cache.released:
            return None
        child = cache.fork()
        self.expected[child] = self.expected[cache].clone()
        return child

    @rule(cache=consumes(caches))
    def release(self, cache):
        if cache is None or cache.released:
            return
        cache.release()
        del self.expected[cache]

    @rule(which=st.sampled_from("ab"), n=st.integers(0, 4))
    def evict(self, which, n):
        self.pools[which].evict(n)

    @rule(which=st.sampled_from("ab"), k=st.integers(1, 6), evict=st.booleans())
    def shrink(self, which, k, evict):
        pool = self.pools[which]
        held = pool.stats()["chunks_held"]
        before = snapshot(pool)
        try:
            pool.shrink(k, evict=evict)
        except (PoolExhaustedError, ValueError):
            assert_same(before, snapshot(pool))
            return
        assert pool.stats()["chunks_held"] == held - k

    @rule(which=st.sampled_from("ab"), k=st.integers(0, 4))
    def grow(self, which, k):
        pool = self.pools[which]
        free = self.alloc.arenas[torch.device("cpu")].free_chunks
        held = pool.stats()["chunks_held"]
        got = pool.grow(k)
        unit = pool._unit[0] if pool._unit else 1      # blocks spanning chunks come whole
        assert got <= min(-(-k // unit) * unit, free) and pool.stats()["chunks_held"] == held + got

    @rule(which=st.sampled_from("ab"), evict=st.booleans())
    def compact(self, which, evict):
        self.pools[which].compact(evict=evict)

    @rule(which=st.sampled_from("ab"))
    def give_back_empty_chunks(self, which):
        self.pools[which].release_free_chunks()

    @invariant()
    def pools_are_consistent(self):
        if not self.pools:
            return
        arena = self.alloc.arenas[torch.device("cpu")]
        held = 0
        for pool in self.pools.values():
            pool.validate()
            s = pool.stats()
            assert s["free_blocks"] + s["used_blocks"] + s["cached_blocks"] == s["capacity_blocks"]
            held += s["chunks_held"]
        assert held + arena.free_chunks == arena.num_chunks
        assert arena.free_chunks == int((arena.owner == -1).sum())

    @invariant()
    def kv_bytes_survive(self):
        for cache, data in self.expected.items():
            assert cache.seq_len == data.shape[2]
            got = read_all(cache)
            assert torch.equal(got, data), f"cache {cache.cache_id} of pool {cache.pool.name}"


# KVTRITON_MACHINE_EXAMPLES raises the number of runs for a longer local soak.
PoolMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("KVTRITON_MACHINE_EXAMPLES", 100)), stateful_step_count=30, deadline=None,
    report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow],
    phases=tuple(Phase) if os.environ.get("KVTRITON_MACHINE_SHRINK", "1") == "1"
    else (Phase.explicit, Phase.reuse, Phase.generate))
test_pool_machine = PoolMachine.TestCase
